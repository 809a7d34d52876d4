"""featx: transfer learning on small image datasets — cached pretrained features, classical heads, fine-tuning."""
__version__ = "0.1.0"

from .backbones import BackboneSpec, Preprocess, Tap, Weights, create_backbone, list_backbones, register_backbone  # noqa: E402
from .errors import FeatxError  # noqa: E402
from .extract import FeatureExtractor, extract  # noqa: E402

__all__ = ["BackboneSpec", "Preprocess", "Tap", "Weights", "register_backbone", "FeatxError", "FeatureExtractor", "create_backbone", "extract", "list_backbones", "__version__"]
