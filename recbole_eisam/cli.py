"""Command line of ``run_recbole_eisam.py``: RecBole's ``--key=value`` style plus a few options."""

import argparse
import ast
import os
import sys

import yaml

from recbole_eisam.errors import EISAMError

#: exceptions that carry a user-facing sentence; anything else is a bug and keeps its traceback
USER_ERRORS = (EISAMError, ValueError, FileNotFoundError)


def _literal(text):
    """``(True, value)`` when ``text`` spells a Python literal, else ``(False, None)``."""
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False, None  # not a literal: a plain string such as 'eisam' or 'ml-100k'
    return isinstance(value, (str, int, float, list, tuple, dict, bool, type(None))), value


def literal_value(text):
    """A string as the value it spells, the way RecBole's Config reads one (numbers, lists,
    dicts, ``True``, ``None``; ``true`` / ``false`` in any case; YAML's nulls ``~`` and ``null``
    as in properties/), but with ``ast.literal_eval``: nothing is executed, and anything else
    stays the string."""
    ok, value = _literal(text)
    if ok:
        return value
    lowered = text.strip().lower()
    if lowered in ("~", "null"):
        return None
    return lowered == "true" if lowered in ("true", "false") else text


def convert_value(text):
    """A command-line value: :func:`literal_value`, or, for text that is no literal, a list /
    dict in YAML flow style as in the YAML files (``[movie_title, genre]``)."""
    ok, _ = _literal(text)
    if not ok and text.strip()[:1] in ("[", "{"):
        try:
            parsed = yaml.safe_load(text)
            if isinstance(parsed, (list, dict)):
                return parsed
        except yaml.YAMLError:
            pass
    return literal_value(text)


def parse_overrides(extra):
    """``['--lr=0.1', '--train_method=eisam']`` -> ``{'lr': 0.1, 'train_method': 'eisam'}``."""
    overrides = {}
    for arg in extra:
        if not arg.startswith("--") or "=" not in arg:
            raise EISAMError(f"Argument '{arg}' is not of the form --key=value.")
        key, value = arg[2:].split("=", 1)
        overrides[key] = convert_value(value)
    return overrides


def config_files_option(args):
    """The ``--config_files`` option as a list of paths (``None`` when not given)."""
    return args.config_files.split() if args.config_files else None


def build_parser(description):
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False)
    parser.add_argument("--model", "-m", default="LLMRec", help="model name (default: LLMRec)")
    parser.add_argument("--dataset", "-d", default="ml-100k", help="dataset name (default: ml-100k)")
    parser.add_argument("--config_files", default=None, help="space-separated YAML files, loaded after the defaults")
    parser.add_argument("--debug", action="store_true", help="show the traceback of errors")
    return parser


def main_guard(main, argv=None):
    """Run ``main(argv)``; report bad input as one line on stderr with exit code 2.

    An interruption (Ctrl-C, SIGTERM) is one line too: where the checkpoint to resume from
    is, for an interrupted training, with exit code 128 + the signal's number. A reader that
    stops early (``| head``) ends the command quietly, with 141 as for SIGPIPE.
    """
    argv = sys.argv[1:] if argv is None else argv
    try:
        return main(argv)
    except USER_ERRORS as err:
        if "--debug" in argv:
            raise
        message = str(err).strip().strip('"').strip("'") or type(err).__name__
        message = " ".join(line.strip() for line in message.splitlines() if line.strip())  # one line
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # recbole_eisam.errors.TrainingInterrupted among them
        print(f"error: {str(err).strip() or 'interrupted.'}", file=sys.stderr)
        return getattr(err, "exit_code", 130)
    except BrokenPipeError:
        # stdout is gone: point it at /dev/null so the interpreter's final flush stays quiet
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
