"""The one exception kdjax raises for a user's mistake.

The CLI catches it and prints its message without a traceback; everything else is a bug and keeps
its traceback.
"""


class KdjaxError(ValueError):
  """A bad config, dataset, checkpoint or argument; the message says what to fix."""


class Preempted(Exception):
  """SIGTERM arrived; the stage saved a checkpoint and stopped. Re-running resumes it."""
