"""LLMRec with a catalog of 100,000 items: encoding streams in batches, full-sort evaluation and
EISAM's head scope hold no [users x items] matrix beyond one batch (the peak memory is measured)."""

import json
import os
import subprocess
import sys

from test_llmrec import save_tiny_llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_catalog(root, n_items, n_users=2000, per_user=50):
    """``n_users`` users with ``per_user`` interactions each, cycling through ``n_items`` items
    (most items are seen once or twice), and a title for every item."""
    folder = os.path.join(root, "catalog")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "catalog.inter"), "w") as f:
        f.write("user_id:token\titem_id:token\ttimestamp:float\n")
        for u in range(n_users):
            for t in range(per_user):
                f.write(f"u{u}\ti{(u * per_user + t * 7919) % n_items}\t{t}\n")
    with open(os.path.join(folder, "catalog.item"), "w") as f:
        f.write("item_id:token\tmovie_title:token_seq\n")
        for i in range(n_items):
            f.write(f"i{i}\tItem {i}\n")
    return root


PEAK_RSS = """
import resource, runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as exit:
    code = exit.code
else:
    code = 0
with open("peak_rss_kib", "w") as f:
    f.write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
sys.exit(code)
"""


def peak_rss_mib(args, cwd):
    """Run ``run_recbole_eisam.py`` in a fresh process; its own peak RSS in MiB and its result."""
    out = os.path.join(cwd, "result.json")
    script = os.path.join(ROOT, "run_recbole_eisam.py")
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS, script, *args, f"--result_file={out}"],
                          capture_output=True, text=True, cwd=cwd, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(cwd, "peak_rss_kib")) as f:
        peak = int(f.read()) / 1024
    with open(out) as f:
        return peak, json.load(f)


def test_hundred_thousand_items_run_in_bounded_memory(tmp_path):
    """100,000 items and EISAM in head scope, 1,000 then 4,000 users: the peak grows by less
    than half of what the [users x items] float32 scores of the 3,000 extra test users
    (1,144 MiB) would add, so no such matrix is held beyond one evaluation batch. (Measured on
    the 2-core EPYC: 716 MiB for 1,000 users, 1,073 MiB for 4,000; the growth is the data of the
    extra users and the allocator's, not a score matrix.)"""
    llm = save_tiny_llama(tmp_path / "llama")
    peaks = {}
    for n_users in (1000, 4000):
        root = tmp_path / str(n_users)
        data_path = write_catalog(str(root / "data"), 100_000, n_users=n_users, per_user=25)
        args = ["--model=LLMRec", "--dataset=catalog", f"--data_path={data_path}", f"--llm_path={llm}",
                "--llm_gguf_file=None", "--llm_num_layers=None", "--lora_r=4", "--max_item_tokens=8",
                "--max_history_items=4", "--MAX_ITEM_LIST_LENGTH=10", "--projection_size=16", "--item_id_tokens=False",
                "--load_col={'inter': ['user_id', 'item_id', 'timestamp'], 'item': ['item_id', 'movie_title']}",
                "--train_method=eisam", "--eisam_scope=head", "--epochs=1", "--train_sample_num=256",
                "--train_batch_size=32", "--eval_batch_size=128", "--item_encode_batch_size=512",
                "--show_progress=False", "--metrics=['Hit','NDCG','TailNDCG','TailMRR']", "--topk=[10]",
                f"--checkpoint_dir={root / 'saved'}", "--use_gpu=False"]
        peaks[n_users], result = peak_rss_mib(args, str(root))
        assert 0 <= result["test_result"]["tailmrr"] <= 1
    print(f"peak RSS with 100,000 items: {peaks[1000]:.0f} MiB for 1,000 users, {peaks[4000]:.0f} MiB for 4,000")
    full_matrix = 3000 * 100_000 * 4 / 2**20
    assert peaks[4000] - peaks[1000] < full_matrix / 2, peaks
