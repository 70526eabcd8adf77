"""csgguard: flag adversarial images from the gate patterns of a Class-Specific Gate CNN.

The Python API mirrors the CLI, one call per command::

    from csgguard import TrainConfig, train, load_model
    result = train(TrainConfig(data="digits"), "runs/default")
    loaded = load_model("runs/default")
"""

__version__ = "0.1.0"

from .data import Dataset, Split, load_dataset  # noqa: E402
from .errors import ArtifactError, CsgguardError, DataError  # noqa: E402
from .features import Features, extract_features  # noqa: E402
from .models import ClassSpecificGate, CSGNet, ModelConfig  # noqa: E402
from .models.store import LoadedModel, load_model, save_model  # noqa: E402
from .train import TrainConfig, TrainResult, train  # noqa: E402

__all__ = [
    "__version__", "Dataset", "Split", "load_dataset", "ArtifactError", "CsgguardError", "DataError",
    "Features", "extract_features", "ClassSpecificGate", "CSGNet", "ModelConfig", "LoadedModel",
    "load_model", "save_model", "TrainConfig", "TrainResult", "train",
]
