"""The error boundary shared by ``train.py``, ``eval.py`` and ``python -m model1.ablate``.

An expected error (bad input, a locked or incompatible run directory, a full disk, a
diverged loss) prints one line, ``error: <message>``, on stderr and exits with a code a
scheduler can act on; ``--debug`` shows the full traceback instead. A preempted run
(SIGTERM/SIGINT, checkpoint saved) exits ``EXIT_PREEMPTED`` so it can be requeued.

  EXIT_BAD_INPUT = 2     bad flags/config/data, incompatible run directory
  EXIT_FAILED = 1        the run itself failed (diverged, disk full, run dir locked)
  EXIT_PREEMPTED = 75    EX_TEMPFAIL: try again (resume from the saved checkpoint)
"""
from __future__ import annotations

import sys

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_PREEMPTED = 75


def _flags_parser(argv):
  """absl's parser, but a bad flag or config override is one ``error:`` line, exit 2."""
  from absl import flags
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)
  except (ValueError, KeyError, AttributeError, TypeError, OSError) as e:  # config file
    if "--debug" in argv:
      raise
    print(f"error: {_config_error(e)}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


def _config_error(e: BaseException) -> str:
  if isinstance(e, (KeyError, AttributeError)):
    return (f"unknown config field {_one_line(e)} in a --config.* override; expected a field "
            f"the config defines (see its configs/*.py and model1/config.py)")
  return _one_line(e)


def _one_line(e: BaseException) -> str:
  msg = " ".join(str(e).split()) or type(e).__name__
  return msg if len(msg) < 2000 else msg[:2000] + " ..."


def classify(e: BaseException) -> tuple[int, str] | None:
  """(exit code, message) for an expected error; None for a bug (traceback shown)."""
  from model1 import checkpoint
  if checkpoint.disk_full(e):
    return EXIT_FAILED, ("disk full while writing the run (checkpoint, metrics or cache); "
                         "expected free space: free some or use another --workdir / "
                         "MODEL1_CACHE")
  if isinstance(e, checkpoint.RunLockedError):
    return EXIT_FAILED, _one_line(e)
  if isinstance(e, FloatingPointError):
    return EXIT_FAILED, _one_line(e)
  if isinstance(e, (ValueError, FileNotFoundError, NotADirectoryError)):
    return EXIT_BAD_INPUT, _one_line(e)
  if isinstance(e, OSError) and "Failed loading config file" in str(e):  # ml_collections
    return EXIT_BAD_INPUT, _one_line(e)
  if isinstance(e, PermissionError):
    return EXIT_FAILED, _one_line(e)
  return None


def run_main(main, define_flags=None) -> None:
  """``absl.app.run(main)`` behind the error boundary (adds the ``--debug`` flag).
  ``define_flags`` runs inside the boundary too: ml_collections' config flags load the
  config file and apply ``--config.*`` overrides when they are defined."""
  from absl import app, flags
  if "debug" not in flags.FLAGS:
    flags.DEFINE_bool("debug", False, "Show the full traceback of an expected error.")
  if define_flags is not None:
    try:
      define_flags()
    except (ValueError, KeyError, AttributeError, TypeError, OSError) as e:
      if "--debug" in sys.argv:
        raise
      print(f"error: {_config_error(e)}", file=sys.stderr)
      sys.exit(EXIT_BAD_INPUT)

  def wrapped(argv):
    from absl import logging
    if logging.get_verbosity() <= logging.INFO and not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)  # Orbax logs every save/restore at INFO
    try:
      code = main(argv)
    except SystemExit:
      raise
    except BaseException as e:  # noqa: BLE001 - the boundary decides what is expected
      got = classify(e)
      if got is None or flags.FLAGS.debug:
        raise
      print(f"error: {got[1]}", file=sys.stderr, flush=True)
      sys.exit(got[0])
    sys.exit(code or 0)
  app.run(wrapped, flags_parser=_flags_parser)
