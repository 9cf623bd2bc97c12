"""The dev inbox (``emailrelay dev``'s page and JSON API), against a real dev stack."""
