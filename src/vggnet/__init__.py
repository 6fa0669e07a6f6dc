"""vggnet: the VGG family of Simonyan & Zisserman (ICLR 2015) as working software."""

from .initialize import copy_matching_layers, init_from_net_a, init_weights
from .model import VGG, VGGConfig, build, create_model, list_models

__version__ = "0.1.0"
__all__ = ["VGG", "VGGConfig", "build", "create_model", "list_models", "init_weights",
           "init_from_net_a", "copy_matching_layers", "__version__"]
