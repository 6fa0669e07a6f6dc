"""vggnet: the VGG family of Simonyan & Zisserman (ICLR 2015) as working software.

``vggnet.create_model("D")`` and the other names below are imported on first use, so that
``import vggnet.cli`` (and ``vggnet --help``) does not import torch.
"""

__version__ = "0.1.0"

# public name -> the module that defines it
_PUBLIC = {"VGG": "model", "VGGConfig": "model", "build": "model", "create_model": "model",
           "list_models": "model", "init_weights": "initialize",
           "init_from_net_a": "initialize", "copy_matching_layers": "initialize"}
__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'vggnet' has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f".{_PUBLIC[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted(__all__)
