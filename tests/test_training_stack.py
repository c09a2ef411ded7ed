from conftest import definition_of, synth_stacks, template


def training_job_parameters(**context) -> tuple[dict, dict]:
    """The training state machine's states and its CreateTrainingJob parameters."""
    states = definition_of(synth_stacks(**context)["Training"].state_machine)["States"]
    return states, states["Train"]["Parameters"]


def test_training_runs_then_registers_the_model_and_records_its_artifact():
    states, _ = training_job_parameters()
    assert states["Train"]["Resource"].endswith(":states:::sagemaker:createTrainingJob.sync")
    assert states["Train"]["Next"] == "CreateModel"
    assert states["CreateModel"]["Next"] == "RecordModel"
    assert states["RecordModel"]["Parameters"]["Name"] == "/scones/dev/model-data-url"
    assert states["RecordModel"]["Parameters"]["Value.$"] == "$.ModelArtifacts.S3ModelArtifacts"
    assert states["Trained"]["Type"] == "Succeed"


def test_pytorch_script_mode_job():
    _, job = training_job_parameters(training_algorithm="pytorch")
    assert job["AlgorithmSpecification"]["TrainingImage"] == "<FindInMap:PytorchTrainingImage>"
    channels = {c["ChannelName"]: c for c in job["InputDataConfig"]}
    assert set(channels) == {"train", "validation", "train_lst", "validation_lst", "code"}
    uri = lambda name: channels[name]["DataSource"]["S3DataSource"]["S3Uri"]  # noqa: E731
    assert all(uri(name).startswith("s3://") for name in channels)
    assert uri("train").endswith("/train") and uri("train_lst").endswith("/train.lst")
    assert uri("validation_lst").endswith("/validation.lst")
    submit_directory = job["HyperParameters"]["sagemaker_submit_directory"]
    assert submit_directory.startswith("/opt/ml/input/data/code/") and submit_directory.endswith(".gz")
    assert job["HyperParameters"]["sagemaker_program"] == "train.py"
    assert job["ResourceConfig"]["InstanceType"] == "ml.m5.xlarge"
    assert job["OutputDataConfig"]["S3OutputPath"].startswith("s3://")
    assert job["OutputDataConfig"]["S3OutputPath"].endswith("/models/")


def test_builtin_algorithm_job_uses_the_classic_channels_and_hyperparameters():
    _, job = training_job_parameters(training_algorithm="builtin")
    channels = {c["ChannelName"]: c for c in job["InputDataConfig"]}
    assert set(channels) == {"train", "validation", "train_lst", "validation_lst"}
    assert {c["ContentType"] for c in channels.values()} == {"application/x-image"}
    assert job["HyperParameters"] == {
        "image_shape": "3,32,32",
        "num_layers": "152",
        "epochs": "30",
        "mini_batch_size": "32",
        "learning_rate": "0.1",
        "use_pretrained_model": "0",
        "num_classes": "2",
        "num_training_samples": "900",
    }
    assert job["ResourceConfig"]["InstanceType"] == "ml.p3.2xlarge"


def test_image_resolves_per_region_from_the_sdk_tables():
    mappings = template("Training", training_algorithm="builtin").to_json()["Mappings"]
    assert (
        mappings["BuiltinTrainingImage"]["us-east-1"]["uri"]
        == "811284229777.dkr.ecr.us-east-1.amazonaws.com/image-classification:1"
    )
    pytorch = template("Training").to_json()["Mappings"]["PytorchTrainingImage"]
    assert pytorch["eu-west-1"]["uri"] == "763104351884.dkr.ecr.eu-west-1.amazonaws.com/pytorch-training:2.6-cpu-py312"


def test_region_given_in_context_gives_a_literal_image():
    _, job = training_job_parameters(region="eu-west-1", account="123456789012")
    assert (
        job["AlgorithmSpecification"]["TrainingImage"]
        == "763104351884.dkr.ecr.eu-west-1.amazonaws.com/pytorch-training:2.6-cpu-py312"
    )


def test_user_hyperparameters_reach_the_job():
    _, job = training_job_parameters(hyperparameters='{"epochs": 12, "lr": 0.01}')
    assert job["HyperParameters"]["epochs"] == "12"
    assert job["HyperParameters"]["lr"] == "0.01"


def test_outputs_name_the_training_state_machine_and_the_model_parameter():
    stack = synth_stacks()["Training"]
    outputs = template("Training").find_outputs("*")
    assert outputs["TrainingStateMachineArn"]["Value"] == {
        "Ref": stack.get_logical_id(stack.state_machine.node.default_child)
    }
    assert outputs["ModelParameterName"]["Value"] == "/scones/dev/model-data-url"
    assert "training.fit --sagemaker" in outputs["TrainingStateMachineArn"]["Description"]
    assert "SSM parameter" in outputs["ModelParameterName"]["Description"]
