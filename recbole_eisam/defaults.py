"""The YAML files under ``properties/``: the one place every default is written.

The code reads configuration values plainly (``config["lora_r"]``); the values come from
these files, loaded in this order, later files winning: RecBole's own defaults,
``overall.yaml``, ``eisam.yaml``, ``model/<Model>.yaml``, ``dataset/<dataset>.yaml``, then
the user's files and ``--key=value``. ``recbole_eisam.patches`` also makes RecBole's own
``Config`` load ``eisam.yaml`` and this package's model files (as RecBole loads its own
models' files), so a plain RecBole user gets the same defaults.
"""

import os
import re

import yaml

PROPERTIES_DIR = os.environ.get(
    "RECBOLE_EISAM_PROPERTIES",
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "properties"),
)


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader reading ``1e-3`` as a float, as RecBole's loader does (YAML 1.1
    would give a string)."""


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def read_yaml(path):
    """The mapping in the YAML file ``path`` (``{}`` for an empty file)."""
    with open(path, "r", encoding="utf-8") as f:
        return yaml.load(f, Loader=YamlLoader) or {}


def model_file(model):
    """``properties/model/<model>.yaml`` when it exists, else ``None``."""
    path = os.path.join(PROPERTIES_DIR, "model", f"{model}.yaml")
    return path if os.path.isfile(path) else None


def default_config_files(model, dataset):
    """The package's YAML layers that exist for ``model`` and ``dataset``, in load order."""
    candidates = [
        os.path.join(PROPERTIES_DIR, "overall.yaml"),
        os.path.join(PROPERTIES_DIR, "eisam.yaml"),
        os.path.join(PROPERTIES_DIR, "model", f"{model}.yaml"),
        os.path.join(PROPERTIES_DIR, "dataset", f"{dataset}.yaml"),
    ]
    return [path for path in candidates if os.path.isfile(path)]


def trainer_defaults():
    """The defaults of the trainer family's keys: ``overall.yaml`` under ``eisam.yaml``."""
    values = read_yaml(os.path.join(PROPERTIES_DIR, "overall.yaml"))
    values.update(read_yaml(os.path.join(PROPERTIES_DIR, "eisam.yaml")))
    return values
