"""The crash loop runs on the same real mount as tests/fs: a loop-mounted XFS SOURCE."""

from tests.fs.conftest import tree, workdir

__all__ = ["tree", "workdir"]
