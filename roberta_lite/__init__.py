"""roberta_lite: a from-scratch RoBERTa with bottleneck adapters, loaded from Hugging Face safetensors checkpoints.

    from roberta_lite import Model, Tokenizer
    model = Model.from_pretrained("roberta-base", num_labels=2, adapter="houlsby")
    model.freeze_base()
"""

from roberta_lite.adapters import AdapterConfig
from roberta_lite.api import Model
from roberta_lite.tokenizer import Tokenizer
from roberta_lite.weights import HF_TO_OURS, CheckpointError, Config

__all__ = ["Model", "Config", "AdapterConfig", "Tokenizer", "CheckpointError", "HF_TO_OURS"]
__version__ = "0.1.0"
