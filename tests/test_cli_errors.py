"""Bad input gets one line on stderr naming the key, file or value, and a non-zero exit.

Most cases go through the real command line (``run_recbole_eisam.py`` in a subprocess);
the pure configuration values and the missing ``gguf`` package (simulated, so in-process)
go through ``main_guard`` and ``run_recbole_eisam.main``. The missing dataset is covered by
``tests/test_quick_start.py``.
"""

import importlib.util
import logging
import os
import subprocess
import sys

import pytest
from conftest import write_tiny_dataset

from recbole_eisam.cli import main_guard
from recbole_eisam.errors import EISAMError
from recbole_eisam.validation import check_atomic_file, hold_console_log

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "run_recbole_eisam.py")
FAST = ["--show_progress=False", "--epochs=1", "--train_batch_size=64", "--eval_batch_size=64",
        "--hidden_size=8", "--inner_size=16", "--n_layers=1", "--n_heads=1", "--use_gpu=False"]


def _script_main():
    spec = importlib.util.spec_from_file_location("run_recbole_eisam_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def assert_one_line_error(returncode, stderr, *needles):
    assert returncode not in (0, None), stderr
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr[-3000:]
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def run_cli(args, cwd):
    proc = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, cwd=cwd, timeout=300)
    return proc.returncode, proc.stderr


def _edit_inter(path, line_number, column, value=None, header=None):
    """Rewrite line ``line_number`` (1 = header) of an atomic file."""
    with open(path) as f:
        lines = f.read().split("\n")
    if header is not None:
        lines[0] = header
    else:
        fields = lines[line_number - 1].split("\t")
        fields[column] = value
        lines[line_number - 1] = "\t".join(fields)
    with open(path, "w") as f:
        f.write("\n".join(lines))


# ------------------------------------------------------------------- through the real CLI
def _case_eisam_rho(tmp_path):
    return ["--eisam_rho=0"], ["eisam_rho", "> 0", "0.0"]


def _case_topk(tmp_path):
    return ["--topk=[10,500]"], ["topk 500", "items of dataset 'tiny'"]


def _case_empty_tail(tmp_path):
    return ["--head_ratio=0.99"], ["head_ratio 0.99", "tail set is empty"]


def _case_header_without_type(tmp_path):
    path = str(tmp_path / "data" / "tiny" / "tiny.inter")
    _edit_inter(path, 1, 0, header="user_id\titem_id:token\trating:float\ttimestamp:float")
    return [], [path, "line 1", "'user_id'", "name:type"]


def _case_header_unknown_type(tmp_path):
    path = str(tmp_path / "data" / "tiny" / "tiny.inter")
    _edit_inter(path, 1, 0, header="user_id:token\titem_id:tokn\trating:float\ttimestamp:float")
    return [], [path, "line 1", "'item_id'", "'tokn'"]


def _case_timestamp_not_a_number(tmp_path):
    path = str(tmp_path / "data" / "tiny" / "tiny.inter")
    _edit_inter(path, 7, 3, value="abc")
    return [], [f"{path} line 7: timestamp value 'abc' is not a number."]


def _case_llm_path_missing(tmp_path):
    missing = str(tmp_path / "no_model_here")
    return ["--model=LLMRec", f"--llm_path={missing}"], ["llm_path", missing]


def _case_llm_gguf_file_missing(tmp_path):
    return ["--model=LLMRec", f"--llm_path={tmp_path}", "--llm_gguf_file=missing.gguf"], [
        "llm_gguf_file", "'missing.gguf'", str(tmp_path)]


def _case_item_text_field_missing(tmp_path):
    # a folder that passes the model-file check but holds no model: the field must be
    # reported before any attempt to load the LLM
    fake = tmp_path / "fake_llm"
    fake.mkdir()
    (fake / "config.json").write_text("{}")
    load_col = "{'inter': ['user_id', 'item_id', 'timestamp'], 'item': ['item_id', 'genre']}"
    return ["--model=LLMRec", f"--llm_path={fake}", f"--load_col={load_col}", "--item_text_fields=[movie_title]"], [
        "'movie_title'", "item_text_fields", "['item_id', 'genre']"]


def _case_inter_without_rows(tmp_path):
    path = str(tmp_path / "data" / "tiny" / "tiny.inter")
    with open(path) as f:
        header = f.readline()
    with open(path, "w") as f:
        f.write(header + "\n")
    return [], [path, "header but no rows"]


def _case_config_not_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("epochs: 3\nmetrics: [Hit, NDCG\ntopk: 10\n")
    return [f"--config_files={path}"], [str(path), "not valid YAML", "line"]


def _case_config_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- epochs\n- 3\n")
    return [f"--config_files={path}"], [str(path), "'key: value' lines", "list"]


CLI_CASES = {
    "inter_without_rows": _case_inter_without_rows,
    "config_not_yaml": _case_config_not_yaml,
    "config_not_a_mapping": _case_config_not_a_mapping,
    "eisam_rho<=0": _case_eisam_rho,
    "topk>items": _case_topk,
    "empty_tail": _case_empty_tail,
    "header_without_type": _case_header_without_type,
    "header_unknown_type": _case_header_unknown_type,
    "timestamp_not_a_number": _case_timestamp_not_a_number,
    "llm_path_missing": _case_llm_path_missing,
    "llm_gguf_file_missing": _case_llm_gguf_file_missing,
    "item_text_field_missing": _case_item_text_field_missing,
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_reports_bad_input_in_one_line(case, tiny_data, tmp_path):
    data_path, name = tiny_data
    args, needles = CLI_CASES[case](tmp_path)
    args = ["--model=SASRec", f"--dataset={name}", f"--data_path={data_path}",
            f"--checkpoint_dir={tmp_path / 'saved'}", *FAST, *args]
    returncode, stderr = run_cli(args, cwd=tmp_path)
    assert returncode == 2
    assert_one_line_error(returncode, stderr, *needles)
    assert not (tmp_path / "saved").exists()  # nothing was trained


def test_debug_shows_the_traceback(tiny_data, tmp_path):
    data_path, name = tiny_data
    returncode, stderr = run_cli(["--model=SASRec", f"--dataset={name}", f"--data_path={data_path}",
                                  "--train_method=foo", "--debug"], cwd=tmp_path)
    assert returncode != 0
    assert "Traceback" in stderr and "train_method must be one of" in stderr


# ------------------------------------------------------------------------------ in-process
@pytest.mark.parametrize(
    "override, needles",
    [
        ("--eisam_lambda=-0.5", ["eisam_lambda", ">= 0", "-0.5"]),
        ("--head_ratio=1.5", ["head_ratio", "(0, 1)", "1.5"]),
        ("--head_ratio=0", ["head_ratio", "(0, 1)", "got 0"]),
        ("--train_method=sharp", ["train_method", "'sharp'", "eisam"]),
        ("--eisam_weight=cubic", ["eisam_weight", "'cubic'", "power"]),
        ("--eisam_rho=abc", ["eisam_rho", "'abc'"]),
        ("--topk=abc", ["topk", "abc"]),
        ("--lr_scheduler=step", ["lr_scheduler", "'step'", "cosine"]),
        ("--lr_warmup_steps=-3", ["lr_warmup_steps", "integer >= 0", "-3"]),
        ("--reweight_eisam_weight=yes", ["reweight_eisam_weight", "True or False", "'yes'"]),
        ("--eisam_weight_norm=sum", ["eisam_weight_norm", "'sum'", "max, mean"]),
        ("--base_loss=focal", ["base_loss", "'focal'", "logit_adjust"]),
        ("--train_method=erm --base_loss=logit_adjust", ["train_method=erm", "base_loss=logit_adjust"]),
        ("--imbsam_split=median", ["imbsam_split", "'median'", "eta"]),
        ("--imbsam_eta=0", ["imbsam_eta", "integer >= 1", "got 0"]),
        ("--imbsam_eta=abc", ["imbsam_eta", "'abc'"]),
        ("--eisam_start_epoch=-2", ["eisam_start_epoch", "integer >= 0", "-2"]),
        ("--eisam_start_epoch=1.5", ["eisam_start_epoch", "integer >= 0", "1.5"]),
        ("--logit_adjust_tau=-1", ["logit_adjust_tau", ">= 0", "-1"]),
        ("--train_method=logit_adjust_posthoc --logit_adjust_tau=0", ["logit_adjust_posthoc", "logit_adjust_tau > 0"]),
        ("--reweight_beta=nan", ["reweight_beta", "must be a number", "nan"]),
        ("--eisam_rho=9**9**9", ["eisam_rho", "must be a number", "'9**9**9'"]),  # never evaluated
        ("--nproc=0", ["nproc", "integer >= 1", "got 0"]),
        ("--nproc=-2", ["nproc", "integer >= 1", "got -2"]),
        ("--nproc=two", ["nproc", "integer >= 1", "'two'"]),
        ("--model=LLMRec --llm_quantization=4bit", ["llm_quantization=4bit", "CUDA GPU", "llm_quantization: none"]),
        ("--model=LLMRec --llm_quantization=2bit", ["llm_quantization must be one of none, 8bit, 4bit", "'2bit'"]),
        # a stopping metric the evaluator does not report would fail after the first epoch
        ("--valid_metric=TailMRR", ["valid_metric 'TailMRR'", "ndcg@10", "tailndcg@20", "add it to metrics"]),
        ("--valid_metric=NDCG@50", ["valid_metric 'NDCG@50'", "ndcg@20", "cut-off in topk"]),
        ("--metrics=['NDCG'] --topk=[5]", ["valid_metric 'NDCG@10'", "(ndcg@5)"]),
    ],
)
def test_bad_values_are_refused_before_loading_data(override, needles, tmp_path, capsys):
    # an empty data_path: the value must be refused before the (missing) data is looked at
    argv = ["--model=SASRec", "--dataset=tiny", f"--data_path={tmp_path / 'empty'}", *override.split()]
    code = main_guard(_script_main(), argv)
    assert code == 2
    assert_one_line_error(code, capsys.readouterr().err, *needles)


@pytest.mark.parametrize(
    "metrics, topk, valid_metric",
    [(["TailMRR", "NDCG"], [10], "TailMRR"), (["TailNDCG"], [10, 50], "tailndcg@50"),
     (["TailCoverage"], 20, "TailCoverage@20"), (["GAUC", "Hit"], [1], "GAUC")],
)
def test_a_stopping_metric_that_is_evaluated_passes(metrics, topk, valid_metric, tiny_data, tmp_path):
    # the names the check accepts are the names the evaluator reports: one epoch stops on them
    from recbole_eisam.quick_start import run

    data_path, name = tiny_data
    config = {"data_path": data_path, "checkpoint_dir": str(tmp_path / "saved"), "epochs": 1, "show_progress": False,
              "hidden_size": 8, "inner_size": 16, "n_layers": 1, "n_heads": 1, "use_gpu": False,
              "metrics": metrics, "topk": topk, "valid_metric": valid_metric}
    if "GAUC" in metrics:
        config["eval_args"] = {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "uni100"}
    result = run("SASRec", name, config_dict=config)
    assert result["best_valid_score"] == result["best_valid_result"][valid_metric.lower()]


def test_gguf_file_without_the_gguf_package(tmp_path, monkeypatch, capsys):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    argv = ["--model=LLMRec", "--dataset=tiny", f"--data_path={tmp_path / 'empty'}", f"--llm_path={tmp_path / 'm.gguf'}"]
    code = main_guard(_script_main(), argv)
    assert_one_line_error(code, capsys.readouterr().err, "'m.gguf'", "gguf package", "pip install gguf")


# ------------------------------------------------------------------------------ the pieces
def test_check_atomic_file_pinpoints_the_line(tmp_path):
    path = tmp_path / "x.inter"
    # blank line 3 is kept in the count; line 5 has a bad float_seq entry, line 6 a bad float
    path.write_text("a:token\tv:float_seq\tb:float\nx\t1 2\t1\n\ny\t3 4\tNA\nz\t5 zz\t2\nw\t6\tq\n")
    with pytest.raises(EISAMError, match=r"x\.inter line 5: v value 'zz' is not a number\."):
        check_atomic_file(str(path))
    # unloaded columns are not checked; empty and NA values are missing values, not errors
    check_atomic_file(str(path), load_col={"a"})
    path.write_text("a:token\tb:float\nx\t\ny\tNA\nz\t1e3\n")
    check_atomic_file(str(path))
    path.write_text("a:token,b:float\nx,1\n")
    with pytest.raises(EISAMError, match=r"header column 'a:token,b:float' is not of the form name:type"):
        check_atomic_file(str(path))


def test_hold_console_log_drops_records_on_bad_input_and_replays_them_otherwise(capsys):
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    root.addHandler(handler)
    level = root.level
    root.setLevel(logging.INFO)
    try:
        with pytest.raises(EISAMError):
            with hold_console_log():
                root.info("config dump")
                raise EISAMError("bad value")
        assert "config dump" not in capsys.readouterr().err
        with hold_console_log():
            root.info("config dump")
            assert "config dump" not in capsys.readouterr().err
        assert "config dump" in capsys.readouterr().err
        with pytest.raises(RuntimeError):  # a bug: the context is printed with it
            with hold_console_log():
                root.info("context")
                raise RuntimeError("bug")
        assert "context" in capsys.readouterr().err
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def test_write_tiny_dataset_is_clean(tmp_path):
    """The fixture's files pass the checks (no false alarm)."""
    data_path = write_tiny_dataset(str(tmp_path))
    for ext in ("inter", "item"):
        check_atomic_file(os.path.join(data_path, "tiny", f"tiny.{ext}"))


def test_command_line_values_are_literals_never_code():
    from recbole_eisam.cli import convert_value

    assert convert_value("1e-3") == 0.001 and convert_value("-0.5") == -0.5 and convert_value("7") == 7
    assert convert_value("[10, 20]") == [10, 20] and convert_value("{'max_norm': 5}") == {"max_norm": 5}
    assert convert_value("None") is None and convert_value("True") is True and convert_value("false") is False
    assert convert_value("~") is None and convert_value("null") is None  # YAML's nulls, as properties/ writes them
    assert convert_value("[movie_title, genre]") == ["movie_title", "genre"]  # YAML flow style
    assert convert_value("ml-100k") == "ml-100k" and convert_value("eisam") == "eisam"
    assert convert_value("'\\n{item}'") == "\n{item}"  # a quoted string stays a string, never YAML
    assert convert_value("9**9**9") == "9**9**9"  # an expression stays text: nothing runs
    assert convert_value("__import__('os').getcwd()") == "__import__('os').getcwd()"


def test_quantization_needs_cuda_bitsandbytes_and_a_model_folder(monkeypatch):
    import torch

    from recbole_eisam.model.llm_backbone import quantization_config

    assert quantization_config("none", "cpu") is None
    with pytest.raises(ValueError, match="needs a CUDA GPU, but this run's device is cpu"):
        quantization_config("8bit", "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine without bitsandbytes
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ValueError, match=r'bitsandbytes package: pip install "recbole-eisam\[gpu\]"'):
        quantization_config("4bit", "cuda")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ValueError, match="'m.gguf' is a GGUF file"):
        quantization_config("4bit", "cuda", gguf_file="m.gguf")


def _two_layer_llama():
    from transformers import LlamaConfig, LlamaModel

    return LlamaModel(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  num_key_value_heads=1, vocab_size=50))


@pytest.mark.parametrize("value, kept", [(None, 2), (1, 1), (5, 2)])
def test_llm_num_layers_keeps_the_first_layers(value, kept):
    from recbole_eisam.model.llm_backbone import keep_first_layers

    model = _two_layer_llama()
    assert keep_first_layers(model, value) == kept == len(model.layers) == model.config.num_hidden_layers


@pytest.mark.parametrize("value", ["~x", "two", 2.5, True, 0])
def test_a_bad_llm_num_layers_is_one_sentence_naming_the_key(value):
    from recbole_eisam.model.llm_backbone import keep_first_layers

    model = _two_layer_llama()
    with pytest.raises(ValueError, match="llm_num_layers must be"):
        keep_first_layers(model, value)


def test_a_reader_that_stops_early_ends_the_command_quietly():
    # `python -m recbole_eisam.analysis.compare_topk ... | head`: the pipe closes under a
    # command still printing, which must not end in a traceback
    code = (
        "import sys; from recbole_eisam.cli import main_guard\n"
        "def main(argv):\n"
        "    for i in range(200000):\n"
        "        print(f'line {i}')\n"
        "    return 0\n"
        "sys.exit(main_guard(main, []))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT)
    assert proc.stdout.readline() == "line 0\n"
    proc.stdout.close()
    stderr = proc.stderr.read()
    assert proc.wait(timeout=60) == 141
    assert stderr == ""
