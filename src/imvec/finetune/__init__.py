"""Fine-tuning the TF-Hub modules on your own labelled images, and predicting with them.

``finetune(FinetuneConfig(data, model, output, mode="head" | "full"))`` writes a run
directory whose ``model.safetensors`` ``imvec.load`` opens as a classification module
with its class names; ``predict(images, run_dir_or_handle, k)`` reads top-k labels.
"""

from imvec.finetune.config import MODES, FinetuneConfig
from imvec.finetune.predict import Prediction, load_classifier, predict
from imvec.finetune.toy import make_toy_dataset
from imvec.finetune.train import RunResult, finetune

__all__ = ["MODES", "FinetuneConfig", "Prediction", "RunResult", "finetune", "load_classifier",
           "make_toy_dataset", "predict"]
