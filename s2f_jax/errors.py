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


def check_ints(config, *keys: str, minimum: int = 0) -> None:
  """UserError unless every dotted config key holds an int ≥ `minimum` (0: non-negative, 1: positive)."""
  kind = {0: 'a non-negative integer', 1: 'a positive integer'}.get(minimum, f'an integer ≥ {minimum}')
  for k in keys:
    v = _lookup(config, k)
    if not isinstance(v, int) or v < minimum:
      raise UserError(f'{k}={v!r} must be {kind}')
