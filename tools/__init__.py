"""The tools bundle (``tools/configs/analyze.json``, code in ``common/analysis``) and the study runner
(``python -m tools.study``, DESIGN.md section 8)."""
