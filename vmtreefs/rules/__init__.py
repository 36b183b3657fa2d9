"""The rules of the tree: pure code, no trio, no I/O.

Every check that decides whether an operation may happen, and what it turns
into, lives here, so the rules can be tested exhaustively without a kernel, a
database or an engine. The orchestrator asks a rule for a *plan*, carries it
out with the store and the engine, then has the namespace *apply* it: the
namespace is the only writer of the model's state.
"""
