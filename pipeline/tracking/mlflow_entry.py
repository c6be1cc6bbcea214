"""The MLflow "model from code" entry (pipeline/tracking/mlflow_model.py logs this file): MLflow
runs it to build the pyfunc, so no pickled Python object is stored with the model and
loading it unpickles nothing (the weights are read weights-only)."""
import mlflow

from pipeline.tracking.mlflow_model import CLIPEmbeddings

mlflow.models.set_model(CLIPEmbeddings())
