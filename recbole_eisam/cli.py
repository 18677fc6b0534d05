"""Command line of ``run_recbole_eisam.py``: RecBole's ``--key=value`` style plus a few options."""

import argparse
import sys

from recbole_eisam.errors import EISAMError

#: exceptions that carry a user-facing sentence; anything else is a bug and keeps its traceback
USER_ERRORS = (EISAMError, ValueError, FileNotFoundError)


def convert_value(text):
    """Turn a command-line string into a Python value the way RecBole's Config does."""
    try:
        value = eval(text, {"__builtins__": {}}, {})  # literals only: numbers, lists, dicts...
        if value is None or isinstance(value, (str, int, float, list, tuple, dict, bool)):
            return value
    except Exception:  # not a literal: a plain string such as 'eisam' or 'ml-100k'
        pass
    if text.strip()[:1] in ("[", "{"):  # YAML flow style, as in the YAML files: [movie_title, genre]
        import yaml

        try:
            value = yaml.safe_load(text)
            if isinstance(value, (list, dict)):
                return value
        except yaml.YAMLError:
            pass
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    return text


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
    is, for an interrupted training, with exit code 128 + the signal's number.
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
