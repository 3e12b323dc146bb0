"""`inferstack finetune`: a folder of labelled photos -> a served model (transfer learning + a
hyperparameter search on Spark). Heavy imports (TensorFlow, PySpark) happen inside the stages."""
