"""The offline worlds the tests and studies run in: tiny random pipelines (``tiny``), tiny scorers
(``tiny_scorers``), the fit probe (``fitprobe``) and the trained CPU world with its study (``world``).
"""
