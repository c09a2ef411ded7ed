"""Run the synthesized scones app on one machine: moto for AWS, our own runtimes for Lambda and SageMaker."""
