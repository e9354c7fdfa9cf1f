"""`credbroker run` as a pipeline.

- ``pipeline``: ``Run``, whose ``execute`` reads top to bottom like the README's promises, and ``run()``;
- ``options``: ``RunOptions``, the one value the CLI and library callers build (``RunOptions.build``);
- ``child``: resolving, spawning, supervising and stopping the bot's process tree;
- ``profiles``: several profiles in one run (collisions, all-or-none fetch, the combined view);
- ``console``: the broker's one-line messages to the operator.

Nothing is imported here, so that ``broker.rotation`` (loaded by bots that refresh their signer) can take
``console.say`` without loading the pipeline. ``broker.runner`` re-exports the old names.
"""
