"""What evaluate, report and audit compute and draw from predictions: calibration (ECE,
reliability, temperature scaling), the samples to explain and the errors to look at,
deterministic figures, and the audit's label issues, outliers and poor images (`audit`, with
cleanlab) and its report (`audit_report`). NumPy, scikit-learn, cleanlab and Matplotlib only:
no framework."""
