"""The Hydra configs of the commands (``spar-train``, ``spar-eval``, ...), shipped as package
data: the commands find them as ``pkg://spar.configs``, Python code as :data:`CONFIG_DIR`.

Importing this package also registers the structured configs (Hydra's ``ConfigStore``, group
``schema``) that hold the defaults, so that no YAML file repeats one: a YAML names its schema in
its defaults list and writes only what differs from it.

- ``schema/teacher``: :class:`spar.models.teacher_config.TeacherSettings` (``configs/teacher``);
- ``schema/optim``, ``schema/trainer``: :class:`spar.distill.settings.OptimSettings`,
  :class:`~spar.distill.settings.TrainerSettings` (``optim``, ``trainer`` of ``train.yaml``);
- ``schema/lposs``, ``schema/anyup``: :class:`spar.refine.lposs.LPOSSSettings`,
  :class:`spar.refine.anyup.AnyUpSettings` (``configs/refine``, ``configs/upsample``);
- ``schema/dataset``: :class:`spar.protocol.BenchmarkSettings` (``configs/dataset/protocol``);
- ``schema/protocol/<field>``: one field of :data:`spar.protocol.PROTOCOL` for the commands
  that read it at the top level (``segment``: bounds, templates, logit scale, thresholds;
  ``extract_features``: bounds; ``eval``: templates). These are plain nodes, not typed: a typed
  node at the top level would refuse the command's other keys.

Hydra imports this package when it reads ``pkg://spar.configs``; code that composes from
:data:`CONFIG_DIR` imports it by naming :data:`CONFIG_DIR`.
"""

import dataclasses
from pathlib import Path

from hydra.core.config_store import ConfigStore

from ..distill.settings import OptimSettings, TrainerSettings
from ..models.teacher_config import TeacherSettings
from ..protocol import BenchmarkSettings, EvalProtocol, protocol_defaults
from ..refine.anyup import AnyUpSettings
from ..refine.lposs import LPOSSSettings

#: The folder of the configs (``train.yaml``, ``backbone/``, ``dataset/``, ...).
CONFIG_DIR = Path(__file__).resolve().parent

#: ``schema/<name>`` -> the dataclass that types that config node and holds its defaults.
SCHEMAS: dict[str, type] = {
    "teacher": TeacherSettings,
    "optim": OptimSettings,
    "trainer": TrainerSettings,
    "lposs": LPOSSSettings,
    "anyup": AnyUpSettings,
    "dataset": BenchmarkSettings,
}


def register_schemas() -> None:
    """Store the ``schema`` group in Hydra's ``ConfigStore`` (idempotent)."""
    store = ConfigStore.instance()
    for name, schema in SCHEMAS.items():
        store.store(group="schema", name=name, node=schema)
    for field in dataclasses.fields(EvalProtocol):
        node = protocol_defaults(field.name)
        store.store(group="schema/protocol", name=field.name, node=node)


register_schemas()
