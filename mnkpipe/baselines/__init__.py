"""MAML and iMAML baselines (docs/math.md sec. 4): conv-4 net, meta-gradients, training with validation selection
(and the test curve from which the notebook's biased test selection is taken);
the label-embedding feature extractor (docs/math.md sec. 2.3)."""
from .convnet import make_convnet
from .extractor import EmbeddingSettings, Extractor, train_extractor
from .imaml import imaml_hypergrad, imaml_inner
from .maml import maml_inner, maml_meta_loss
from .train import BaselineSettings, chosen_on_test, run_baseline, task_accuracies

__all__ = ["make_convnet", "maml_inner", "maml_meta_loss", "imaml_inner", "imaml_hypergrad",
           "BaselineSettings", "run_baseline", "task_accuracies", "chosen_on_test",
           "EmbeddingSettings", "Extractor", "train_extractor"]
