"""Every table Kiln has, in one `MetaData`: what Alembic compares the migrations against.

The modules of tables import `models` (for `Base`) and never each other backwards; this module is
the one place that imports them all. Nothing at run time needs it but Alembic and the tests.
"""

from __future__ import annotations

from kiln.db import audit_models, models, web_models, webhook_models

metadata = models.Base.metadata
TABLE_MODULES = (models, web_models, webhook_models, audit_models)
"""Add a new module of tables here, or Alembic will not see its tables."""
