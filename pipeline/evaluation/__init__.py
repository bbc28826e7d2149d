"""What evaluate and report compute and draw from predictions: calibration (ECE, reliability,
temperature scaling), the samples to explain and the errors to look at, and deterministic
figures. NumPy, scikit-learn and Matplotlib only: no framework."""
