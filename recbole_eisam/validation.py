"""Checks of the user's input, run before anything slow; each failure is one sentence.

* :func:`validate_config` runs right after RecBole's ``Config`` is built, before the data
  and the model are loaded: the EISAM keys (through
  :func:`recbole_eisam.trainer.eisam.resolve_settings`), ``head_ratio``, the trainer the
  model gets, LLMRec's model files (``llm_path``, ``llm_gguf_file``, the ``gguf`` package)
  and the headers and numeric columns of the dataset's atomic files
  (:func:`check_atomic_files`), and that ``valid_metric`` is one of the metrics evaluated.
* :func:`validate_dataset` runs once the dataset is built: ``topk`` against the number of
  items, a non-empty tail set under ``head_ratio``, LLMRec's ``item_text_fields``.
* :func:`hold_console_log` keeps the console's log records back while the data is loaded
  and checked, so that bad data is reported alone (the log file still gets every record).

Every error is an :class:`~recbole_eisam.errors.EISAMError` or a ``ValueError`` /
``FileNotFoundError``: the command line prints it as one line, without a traceback.
"""

import contextlib
import logging
import math
import os
import sys
import warnings

import numpy as np
import pandas as pd
import yaml
from recbole.evaluator.register import metrics_dict
from recbole.utils import get_model

from recbole_eisam.cli import USER_ERRORS
from recbole_eisam.errors import EISAMError
from recbole_eisam.model.item_text import check_item_text_fields
from recbole_eisam.model.llm_backbone import quantization_config, resolve_dtype, resolve_model_source
from recbole_eisam.model import LLMRec, LLMRecGen
from recbole_eisam.registry import trainer_class
from recbole_eisam.trainer.settings import NUMBER_KEYS, resolve_settings
from recbole_eisam.utils.longtail import num_head_items
from recbole_eisam.utils.windows import windows_per_user

#: the column types of RecBole's atomic files (``recbole.utils.FeatureType``)
FEATURE_TYPES = ("token", "token_seq", "float", "float_seq")

def _value(config, key):
    return config[key] if key in config else None


def _is_number(value):
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


# ---------------------------------------------------------------------------------- config
def validate_config(config):
    """Check every value that can be checked without the data; raise one sentence otherwise."""
    for key in NUMBER_KEYS:
        value = _value(config, key)
        if value is not None and not _is_number(value):
            raise EISAMError(f"{key} must be a number, got {value!r}.")
    head_ratio = _value(config, "head_ratio")
    if not _is_number(head_ratio) or not 0.0 < float(head_ratio) < 1.0:
        raise EISAMError(
            f"head_ratio must be a number in (0, 1) (the share of items in the head), got {head_ratio!r}."
        )
    nproc = _value(config, "nproc")
    if nproc is not None and (not _is_number(nproc) or int(nproc) != nproc or nproc < 1):
        raise EISAMError(f"nproc must be an integer >= 1 (the number of training processes), got {nproc!r}.")
    windows_per_user(config)
    resolve_settings(config)  # train_method, eisam_weight, eisam_rho, eisam_lambda, ...
    _check_trainer(config)
    _check_valid_metric(config)
    if _is_llmrec(config):
        _check_llm_files(config)
    check_atomic_files(config)


def _check_trainer(config):
    """``train_method`` other than erm needs the EISAM trainer (``quick_start.trainer_class``)."""
    trainer_class(config)


def evaluated_metric_names(config):
    """The names the evaluator reports for ``metrics`` and ``topk``, as ``valid_metric`` spells them.

    A metric read from the top-K lists (``rec.topk``) or the recommended items
    (``rec.items``) is reported at each cut-off (``ndcg@10``, ``tailcoverage@20``); any other
    once (``tailmrr``, ``gauc``). RecBole's ``Config`` has already made ``metrics`` and ``topk``
    lists and refused a metric it does not know.
    """
    names = []
    for metric in config["metrics"]:
        name = metric.lower()
        if {"rec.topk", "rec.items"} & set(metrics_dict[name].metric_need):
            names += [f"{name}@{k}" for k in config["topk"]]
        else:
            names.append(name)
    return names


def _check_valid_metric(config):
    """``valid_metric`` is a name the evaluator will report, else early stopping fails after an epoch."""
    metric, names = config["valid_metric"], evaluated_metric_names(config)
    if metric.lower() not in names:
        raise EISAMError(
            f"valid_metric {metric!r} is not among the metrics evaluated ({', '.join(names)}); "
            f"add it to metrics (with its cut-off in topk) or choose one of these."
        )


def _model_class(config):
    cls = getattr(config, "model_class", None)
    if cls is None:

        cls = get_model(config["model"])
    return cls


def _is_llmrec(config):
    cls = _model_class(config)
    return isinstance(cls, type) and issubclass(cls, (LLMRec, LLMRecGen))


def _check_llm_files(config):
    """LLMRec's (and LLMRecGen's) backbone files exist (and the ``gguf`` package for a GGUF file); no loading."""
    _, gguf_file = resolve_model_source(_value(config, "llm_path"), _value(config, "llm_gguf_file"))
    device = _value(config, "device") or "cpu"
    resolve_dtype(_value(config, "llm_dtype"), device)
    quantization_config(_value(config, "llm_quantization"), device, gguf_file)


def check_yaml_file(path):
    """A config file must be YAML holding ``key: value`` lines (read as RecBole reads it)."""
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = yaml.load(f.read(), Loader=yaml.FullLoader)
    except UnicodeDecodeError:
        raise EISAMError(f"Config file '{path}' is not UTF-8 text.") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise EISAMError(f"Config file '{path}' is not valid YAML: {problem}{where}.") from None
    if data is not None and not isinstance(data, dict):
        raise EISAMError(
            f"Config file '{path}' must hold 'key: value' lines, but its YAML is a {type(data).__name__}."
        )


# ----------------------------------------------------------------------------- atomic files
def _recbole_shipped(path):
    """``True`` for the files RecBole ships itself (its ``ml-100k`` example)."""
    import recbole

    root = os.path.realpath(os.path.dirname(recbole.__file__))
    return os.path.realpath(path).startswith(root + os.sep)


def _load_and_unload_col(config, source):
    """RecBole's ``Dataset._get_load_and_unload_col``: ``(None = all | set, None | set)``."""
    load_col, unload_col = _value(config, "load_col"), _value(config, "unload_col")
    if load_col is None:
        load = None
    elif source not in load_col:
        load = set()
    elif load_col[source] == "*":
        load = None
    else:
        load = set(load_col[source])
    unload = set(unload_col[source]) if unload_col is not None and source in unload_col else None
    return load, unload


def atomic_files(config):
    """``[(path, source)]`` of the atomic files RecBole will read for ``config``, if present."""
    folder, token = config["data_path"], config["dataset"]
    parts = _value(config, "benchmark_filename")
    names = [(f"{token}.{part}.inter", "inter") for part in parts] if parts else [(f"{token}.inter", "inter")]
    names += [(f"{token}.user", "user"), (f"{token}.item", "item")]
    found = []
    for name, source in names:
        path = os.path.join(folder, name)
        if os.path.isfile(path) and _load_and_unload_col(config, source)[0] != set():
            found.append((path, source))
    return found


def check_atomic_files(config):
    """Check the header and the numeric columns of the dataset's atomic files.

    RecBole's own loader fails on these with pandas errors that name neither the file nor
    the line. Files shipped inside RecBole are skipped, as is a dataset loaded from a saved
    ``dataset_save_path``.
    """
    saved = _value(config, "dataset_save_path")
    if saved and os.path.isfile(saved):
        return
    for path, source in atomic_files(config):
        if _recbole_shipped(path):
            continue
        load, unload = _load_and_unload_col(config, source)
        check_atomic_file(
            path,
            load_col=load,
            unload_col=unload,
            field_separator=_value(config, "field_separator") or "\t",
            seq_separator=_value(config, "seq_separator") or " ",
            encoding=_value(config, "encoding") or "utf-8",
        )


def read_header(path, field_separator="\t", encoding="utf-8"):
    """``[(column, name, type)]`` of an atomic file's header line, checked."""
    try:
        with open(path, "r", encoding=encoding) as f:
            line = f.readline()
    except UnicodeDecodeError:
        raise EISAMError(f"{path} line 1 is not {encoding} text; save the file as {encoding} or set encoding.") from None
    if not line.strip():
        raise EISAMError(
            f"{path} line 1 is empty, but must be the header of name:type columns "
            f"separated by field_separator {field_separator!r}."
        )
    line = line[:-1] if line.endswith("\n") else line  # text mode: \r\n is \n already
    header = []
    for column in line.split(field_separator):
        parts = column.split(":")
        if len(parts) != 2 or not parts[0].strip():
            raise EISAMError(
                f"{path} line 1: header column {column!r} is not of the form name:type "
                f"(type one of {', '.join(FEATURE_TYPES)}; columns separated by field_separator "
                f"{field_separator!r})."
            )
        if parts[1] not in FEATURE_TYPES:
            raise EISAMError(
                f"{path} line 1: column {parts[0]!r} has the unknown type {parts[1]!r}; "
                f"use one of {', '.join(FEATURE_TYPES)}."
            )
        header.append((column, parts[0], parts[1]))
    return header


def check_atomic_file(path, load_col=None, unload_col=None, field_separator="\t", seq_separator=" ",
                      encoding="utf-8"):
    """Check an atomic file's header and that its loaded ``float`` / ``float_seq`` columns parse.

    One vectorised pandas read of the numeric columns (C parser); only when it fails is
    the file read again as text to pinpoint the first bad value and its line number.
    """
    header = read_header(path, field_separator, encoding)
    if not _has_rows(path, encoding):
        raise EISAMError(f"{path} has a header but no rows: add the data below line 1, or remove the file.")
    numeric = [
        (column, name, ftype)
        for column, name, ftype in header
        if ftype in ("float", "float_seq")
        and (load_col is None or name in load_col)
        and (unload_col is None or name not in unload_col)
    ]
    if not numeric:
        return
    dtype = {column: np.float64 if ftype == "float" else str for column, _, ftype in numeric}
    try:
        df = pd.read_csv(path, sep=field_separator, usecols=list(dtype), dtype=dtype, encoding=encoding,
                         engine="c")
        for column, _, ftype in numeric:
            if ftype == "float_seq":
                values = df[column].dropna().str.split(seq_separator).explode()
                values = values[values.notna() & (values != "")]
                pd.to_numeric(values, errors="raise")
    except (ValueError, TypeError):
        _pinpoint_bad_number(path, numeric, field_separator, seq_separator, encoding)


def _has_rows(path, encoding):
    """Whether an atomic file has a non-blank line after its header (reads up to the first one)."""
    with open(path, "r", encoding=encoding) as f:
        next(f, None)
        return any(line.strip() for line in f)


def _pinpoint_bad_number(path, numeric, field_separator, seq_separator, encoding):
    """Raise the first value of ``numeric`` columns that Python's ``float`` rejects, with its line."""
    columns = [column for column, _, _ in numeric]
    try:
        df = pd.read_csv(path, sep=field_separator, usecols=columns, dtype=str, encoding=encoding,
                         engine="c", skip_blank_lines=False)
    except UnicodeDecodeError:
        raise EISAMError(f"{path} is not {encoding} text; save the file as {encoding} or set encoding.") from None
    first = None  # (row, name, value) of the earliest bad value over all columns
    for column, name, ftype in numeric:
        raw = df[column]
        if ftype == "float":
            cells = raw[raw.notna()]
        else:
            cells = raw[raw.notna()].str.split(seq_separator).explode()
            cells = cells[cells.notna() & (cells != "")]
        suspects = cells[pd.to_numeric(cells, errors="coerce").isna()]
        for row, value in suspects.items():
            try:
                float(value)
            except ValueError:
                if first is None or row < first[0]:
                    first = (row, name, value)
                break
    if first is not None:
        row, name, value = first
        # the header is line 1 and blank lines are kept as rows: data row r is line r + 2
        raise EISAMError(f"{path} line {row + 2}: {name} value {value!r} is not a number.")


# --------------------------------------------------------------------------------- dataset
def validate_dataset(config, dataset):
    """Checks that need the built dataset: ``topk``, the tail set, LLMRec's item text fields."""
    name = config["dataset"]
    n_items = dataset.item_num - 1  # real items, RecBole's padding id 0 excluded
    topk = [int(k) for k in (config["topk"] or [])]
    if topk and max(topk) > n_items:
        raise EISAMError(
            f"topk {max(topk)} is larger than the {n_items} items of dataset '{name}'; "
            f"use cut-offs of at most {n_items}."
        )
    head_ratio = float(config["head_ratio"])
    n_head = num_head_items(n_items, head_ratio)
    if n_head >= n_items:
        limit = math.floor((n_items - 1) / n_items * 1e4) / 1e4 if n_items > 1 else None
        advice = (
            f"use a head_ratio of at most {limit:g}" if limit
            else "a head / tail split needs at least 2 items"
        )
        raise EISAMError(
            f"head_ratio {head_ratio:g} puts all {n_items} items of dataset '{name}' in the head "
            f"(ceil({head_ratio:g} * {n_items}) = {n_head}), so the tail set is empty; {advice}."
        )
    if _is_llmrec(config):
        fields = _value(config, "item_text_fields") or ["movie_title"]
        check_item_text_fields(dataset, [fields] if isinstance(fields, str) else list(fields))


# ------------------------------------------------------------------------------ console log
def _is_console(handler):
    return (
        isinstance(handler, logging.StreamHandler)
        and not isinstance(handler, logging.FileHandler)
        and any(handler.stream is s for s in (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__))
    )


@contextlib.contextmanager
def hold_console_log():
    """Hold back the root logger's console records (and Python warnings) until the block ends.

    On success they are printed then, in order; on bad input (an error the command line
    reports as one line) they are dropped from the console, so the error is printed alone.
    File handlers are not touched: the log file gets every record as it happens.
    """
    held, filters = [], []  # (handler or None for a warning, record or showwarning's arguments)

    class _Hold(logging.Filter):
        def __init__(self, handler):
            super().__init__()
            self.handler = handler

        def filter(self, record):
            held.append((self.handler, record))
            return False

    for handler in logging.getLogger().handlers:
        if _is_console(handler):
            f = _Hold(handler)
            handler.addFilter(f)
            filters.append((handler, f))
    show_warning = warnings.showwarning
    try:
        with warnings.catch_warnings():  # restores warnings.showwarning on exit
            warnings.showwarning = lambda *args: held.append((None, args))
            yield
    except USER_ERRORS:
        held.clear()
        raise
    finally:
        for handler, f in filters:
            handler.removeFilter(f)
        for handler, item in held:
            if handler is None:
                show_warning(*item)
            else:
                handler.handle(item)
