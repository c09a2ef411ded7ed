"""The training side of scones: the CIFAR-100 ETL (`training.etl`) and the model fit."""
