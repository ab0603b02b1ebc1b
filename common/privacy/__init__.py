"""User-level differential privacy: ε maths and calibration (analysis), the stateful accountant,
the registry of accountants, the mechanisms' randomness and noise, and one party's plan and spending.

Only the accountant's Opacus step hook and the DP optimizer (client/train.py) touch torch; everything
here imports without it, so the audit does too.
"""
