"""Error types that the command line turns into one-line messages."""


class UserError(Exception):
  """Bad user input (config value, path, size). The CLI prints it on one line and exits with code 2."""


class TrainingDiverged(RuntimeError):
  """The training loss became NaN or infinite."""


def choices_error(kind: str, value, valid) -> UserError:
  """`UserError` naming the bad `value` of `kind` and the valid choices."""
  return UserError(f"unknown {kind} {value!r}; valid choices: {', '.join(map(str, valid))}")
