"""Tengine: ``lower`` (IR -> Tengine records and scale table), ``writer`` (MXNet json/params + scale file),
``reference`` (NumPy model of Tengine's int8 arithmetic), ``simulate`` (the lowered graph in MXNet), ``cli``
(``deployq export-tengine``)."""
