"""Evaluation (evaluate.py's work, beside trainers/): the job (`job`), the per-sequence tracking
loop and a rank's sequences tracked to disk (`tracking`), the results layout and statistics
(`results`), the results report (`report`), threshold sweeps (`sweep`), scoring a results folder
(`score`), overlays and timelines (`visuals`), the gate report (`gate_report`); `run.evaluate`
runs an evaluation. Imports nothing here: import the module you need."""
