"""Test helpers for users' own models: `assert_backends_agree`.

    from mhsa_core.testing import assert_backends_agree

    def test_my_model_is_portable():
        assert_backends_agree(build_my_model(), inputs=my_batch)

The implementation lives in `mhsa_core.consistency.testing`.
"""

from mhsa_core.consistency.testing import assert_backends_agree as assert_backends_agree

__all__ = ["assert_backends_agree"]
