"""The one Ray Train loop and driver. A method supplies hooks (build the model, give a step's batch,
compute the loss, validate, any extra state to checkpoint); the loop does seeds, the learning-rate
schedule, the update, clipping, metrics, checkpoints, resume and failure retries, and the driver the
artifact cache, `fit`, the final model and the summary.

    class MyHooks(TrainerHooks): ...                     # on the workers: plain torch
    summary = train(TrainJob(...), prepare, summarize)   # on the driver
"""

from distilray.ray_train.driver import TrainJob, cached_result, train
from distilray.ray_train.hooks import TrainerHooks, WorkerInfo

__all__ = ["TrainJob", "TrainerHooks", "WorkerInfo", "cached_result", "train"]
