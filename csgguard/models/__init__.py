"""Models: the Class-Specific Gate, backbones by name, and the CSG network."""

from .backbones import BACKBONES, build_backbone
from .csg import CSGNet, ModelConfig, ModelOutput, build_model
from .gate import ClassSpecificGate

__all__ = ["BACKBONES", "build_backbone", "CSGNet", "ModelConfig", "ModelOutput", "build_model",
           "ClassSpecificGate"]
