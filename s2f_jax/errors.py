"""Error types that the command line turns into one-line messages."""


class UserError(Exception):
  """Bad user input (config value, path, size). The CLI prints it on one line and exits with code 2."""


class TrainingDiverged(RuntimeError):
  """The training loss became NaN or infinite."""


def choices_error(kind: str, value, valid) -> UserError:
  """`UserError` naming the bad `value` of `kind` and the valid choices."""
  return UserError(f"unknown {kind} {value!r}; valid choices: {', '.join(map(str, valid))}")


def _lookup(config, dotted: str):
  value = config
  for part in dotted.split('.'):
    value = value[part]
  return value


def check_positive_ints(config, *keys: str) -> None:
  """UserError unless every dotted config key holds an int ≥ 1."""
  for k in keys:
    v = _lookup(config, k)
    if not isinstance(v, int) or v < 1:
      raise UserError(f'{k}={v!r} must be a positive integer')


def check_non_negative_ints(config, *keys: str) -> None:
  """UserError unless every dotted config key holds an int ≥ 0."""
  for k in keys:
    v = _lookup(config, k)
    if not isinstance(v, int) or v < 0:
      raise UserError(f'{k}={v!r} must be a non-negative integer')
