"""A recipient's phone number checked once, when it is stored.

Planning a broadcast by SMS parsed and validated every recipient's number again (phonenumbers),
though the directory had validated it on import: a sixth of the event loop's work at 100,000 SMS
recipients. ``recipients.phone_valid`` keeps the import's verdict. Rows stored before this revision
have NULL there and are checked at planning as before, until they are stored again (an import).

Revision ID: 0012
Revises: 0011
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("recipients", sa.Column("phone_valid", sa.Boolean))


def downgrade() -> None:
    with op.batch_alter_table("recipients") as batch:
        batch.drop_column("phone_valid")
