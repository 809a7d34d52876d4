"""featx: transfer learning on small image datasets — cached pretrained features, classical heads, fine-tuning.

The public names below are imported on first use (PEP 562), so ``import featx`` and the CLI stay
fast: a command imports torch, torchvision or scikit-learn only when it needs them.
"""
from importlib import import_module

__version__ = "0.1.0"

# public name -> module that defines it, in data-flow order
_EXPORTS = {
    "FeatxError": "errors",
    "FeatureIdentity": "identity",
    "BackboneSpec": "extraction.backbones", "Preprocess": "extraction.backbones", "Tap": "extraction.backbones", "create_backbone": "extraction.backbones",
    "list_backbones": "extraction.backbones", "register_backbone": "extraction.backbones",
    "Weights": "extraction.weights",
    "extract": "extraction.runner",
    "FeatureExtractor": "transformer",
    "fit_head": "heads.fit",
    "ModelFile": "modelfile",
    "predict": "serve.predictor", "evaluate": "serve.predictor", "load_predictor": "serve.predictor",
    "finetune": "finetuning.training",
    "compare": "heads.leaderboard",
    "advise": "heads.advice",
    "auto": "autosearch",
    "run_pipeline": "pipeline",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'featx' has no attribute '{name}'")


def __dir__():
    return sorted(__all__)
