"""Train and evaluate a model with the EISAM trainer family.

    python run_recbole_eisam.py --model=LLMRec --dataset=ml-100k --train_method=eisam
    python run_recbole_eisam.py --model=SASRec --dataset=ml-100k --config_files="a.yaml b.yaml"

Any RecBole or recbole_eisam key can be given as ``--key=value``. Extra options:
``--result_file=PATH`` (results as JSON), ``--save_topk=PATH`` (test top-K lists as TSV),
``--resume=PATH`` (continue an interrupted training from the checkpoint it names),
``--debug`` (tracebacks instead of one-line errors).

SIGINT (Ctrl-C) or SIGTERM during training writes ``<checkpoint>-resume.safetensors``
after the current step and exits with 128 + the signal number; ``--resume`` with the same
other options continues exactly where it stopped. ``--nproc=N`` trains with N processes
(RecBole's distributed mode: gloo on CPU, NCCL on GPUs; ``--world_size``, ``--ip``,
``--port`` and ``--offset`` for several machines); ``torchrun --nproc_per_node=N
run_recbole_eisam.py ...`` trains the same way, each process joining torchrun's group.
"""

import json
import os
import sys

from recbole_eisam.cli import build_parser, config_files_option, main_guard, parse_overrides
from recbole_eisam.quick_start import run


def main(argv):
    parser = build_parser(__doc__.splitlines()[0])
    parser.add_argument("--result_file", default=None, help="write the results as JSON to this path")
    parser.add_argument("--save_topk", default=None, help="write the test top-K lists as TSV to this path")
    parser.add_argument("--resume", default=None, help="continue training from this checkpoint (...-resume.safetensors)")
    args, extra = parser.parse_known_args(argv)
    overrides = parse_overrides(extra)

    result = run(
        args.model,
        args.dataset,
        config_file_list=config_files_option(args),
        config_dict=overrides,
        result_file=args.result_file,
        save_topk=args.save_topk,
        resume=args.resume,
    )
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 reports
        print(json.dumps({"best_valid_result": result["best_valid_result"], "test_result": result["test_result"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main_guard(main))
