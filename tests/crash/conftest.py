"""The crash loop runs on the same real mount as tests/fs: a loop-mounted XFS SOURCE."""

from tests.fs.conftest import workdir

__all__ = ["workdir"]
