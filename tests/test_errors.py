"""Bad inputs raise clear errors that name the problem, eagerly and under jit.

None of these reach a kernel, so this file compiles nothing heavy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from escort_jax import SparseKernel, sparse_conv
from tests.conftest import random_array, random_pruned_kernel


@pytest.fixture(name="problem")
def problem_fixture():
  rng = np.random.default_rng(501)
  x = random_array(rng, (2, 7, 9, 4))
  kernel = random_pruned_kernel(rng, (3, 3, 4, 6), 0.5)
  return x, SparseKernel.from_dense(kernel), kernel


def _call(x, sk, *args, jit=False, **kw):
  kw.setdefault("method", "escort")
  if jit:
    return jax.jit(lambda x, sk: sparse_conv(x, sk, *args, **kw))(x, sk)
  return sparse_conv(x, sk, *args, **kw)


# (id, modify(x, sk) -> (x, sk, args, kwargs), exception, match)
BAD_CALLS = [
    ("rank3_input", lambda x, sk: (x[0], sk, (), {}), ValueError,
     r"x must have rank 4.*got shape \(7, 9, 4\)"),
    ("rank5_input", lambda x, sk: (x[None], sk, (), {}), ValueError,
     r"rank 4.*vmap"),
    ("channels_mismatch", lambda x, sk: (x[..., :3], sk, (), {}), ValueError,
     r"input has 3 channels.*kernel needs 3 input channels per group.*has 4"),
    ("groups_do_not_divide_input", lambda x, sk: (
        x, sk, (), dict(feature_group_count=3)), ValueError,
     r"feature_group_count=3 does not divide the input's 4 channels"),
    ("groups_do_not_divide_output", lambda x, sk: (
        jnp.concatenate([x] * 4, axis=-1), sk, (),
        dict(feature_group_count=4)), ValueError,
     r"feature_group_count=4 does not divide the kernel's 6 output"),
    ("zero_groups", lambda x, sk: (x, sk, (), dict(feature_group_count=0)),
     ValueError, r"feature_group_count must be a positive int"),
    ("zero_stride", lambda x, sk: (x, sk, ((0, 1), "SAME"), {}), ValueError,
     r"window_strides must be positive.*\(0, 1\)"),
    ("negative_int_stride", lambda x, sk: (x, sk, (-2, "SAME"), {}),
     ValueError, r"window_strides must be positive"),
    ("three_strides", lambda x, sk: (x, sk, ((1, 1, 1), "SAME"), {}),
     ValueError, r"window_strides must be a pair"),
    ("zero_dilation", lambda x, sk: (x, sk, (), dict(rhs_dilation=(1, 0))),
     ValueError, r"rhs_dilation must be positive.*\(1, 0\)"),
    ("negative_dilation", lambda x, sk: (x, sk, (),
                                         dict(rhs_dilation=(-1, 1))),
     ValueError, r"rhs_dilation must be positive"),
    ("unknown_padding", lambda x, sk: (x, sk, ((1, 1), "FULL"), {}),
     ValueError, r"unknown padding 'FULL'"),
    ("padding_three_dims", lambda x, sk: (
        x, sk, ((1, 1), ((1, 1), (1, 1), (1, 1))), {}), ValueError,
     r"padding must give 2 spatial dimensions"),
    ("int32_input", lambda x, sk: (x.astype(jnp.int32), sk, (), {}),
     TypeError, r"x has dtype int32.*supports float32"),
    ("int32_kernel_values", lambda x, sk: (
        x, sk.with_values(sk.values.astype(jnp.int32)), (), {}), TypeError,
     r"kernel has dtype int32"),
    ("int32_bias", lambda x, sk: (x, sk, (),
                                  dict(bias=jnp.ones((6,), jnp.int32))),
     TypeError, r"bias has dtype int32"),
    ("values_too_short", lambda x, sk: (
        x, sk.with_values(sk.values[:-1]), (), {}), ValueError,
     r"values have shape \(\d+,\).*structure has \d+ nonzeros"),
    ("values_2d", lambda x, sk: (
        x, sk.with_values(sk.values[None]), (), {}), ValueError,
     r"values have shape \(1, \d+\)"),
    ("kernel_layout_mismatch", lambda x, sk: (
        x, sk, (), dict(dimension_numbers=("NHWC", "OIHW", "NHWC"))),
     ValueError, r"kernel layout is 'OIHW'.*built with layout 'HWIO'"),
    ("bad_input_layout", lambda x, sk: (
        x, sk, (), dict(dimension_numbers=("NHWD", "HWIO", "NHWC"))),
     ValueError, r"input layout 'NHWD' must be a permutation of 'NCHW'"),
    ("dimension_numbers_not_strings", lambda x, sk: (
        x, sk, (), dict(dimension_numbers=(0, 1, 2))), TypeError,
     r"dimension_numbers must be three layout strings"),
    ("unknown_method", lambda x, sk: (x, sk, (), dict(method="im2col")),
     ValueError, r"unknown method 'im2col'"),
    ("unknown_activation", lambda x, sk: (x, sk, (),
                                          dict(activation="gelu")),
     ValueError, r"unknown activation 'gelu'"),
    ("lhs_dilation", lambda x, sk: (x, sk, (), dict(lhs_dilation=(2, 2))),
     NotImplementedError, r"lhs_dilation.*not supported"),
    ("lhs_dilation_int", lambda x, sk: (x, sk, (), dict(lhs_dilation=2)),
     NotImplementedError, r"lhs_dilation"),
    ("bias_wrong_length", lambda x, sk: (x, sk, (),
                                         dict(bias=jnp.ones((5,)))),
     ValueError, r"bias must have shape \(6,\), got \(5,\)"),
    ("bias_2d", lambda x, sk: (x, sk, (), dict(bias=jnp.ones((1, 6)))),
     ValueError, r"bias must have shape \(6,\), got \(1, 6\)"),
    ("dense_kernel_not_sparse", lambda x, sk: (x, sk.todense(), (), {}),
     TypeError, r"kernel must be a SparseKernel"),
    ("int32_preferred", lambda x, sk: (
        x, sk, (), dict(preferred_element_type=jnp.int32)), TypeError,
     r"preferred_element_type has dtype int32"),
]


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("modify,exc,match", [c[1:] for c in BAD_CALLS],
                         ids=[c[0] for c in BAD_CALLS])
def test_bad_call_raises_clear_error(problem, modify, exc, match, jit):
  x, sk, _ = problem
  x, sk, args, kwargs = modify(x, sk)
  with pytest.raises(exc, match=match):
    _call(x, sk, *args, jit=jit, **kwargs)


@pytest.mark.parametrize("method", ["escort", "dense", "auto"])
def test_errors_do_not_depend_on_method(problem, method):
  x, sk, _ = problem
  with pytest.raises(ValueError, match="does not divide the input's 4"):
    sparse_conv(x, sk, feature_group_count=3, method=method)
  with pytest.raises(NotImplementedError, match="lhs_dilation"):
    sparse_conv(x, sk, lhs_dilation=(2, 1), method=method)


def test_keyword_only_arguments(problem):
  x, sk, _ = problem
  with pytest.raises(TypeError, match="positional"):
    sparse_conv(x, sk, (1, 1), "SAME", (1, 1))


@pytest.mark.parametrize("shape", [(3, 3, 4), (3, 3, 4, 6, 1), (9,)])
def test_from_dense_wrong_rank(shape):
  kernel = np.ones(shape, np.float32)
  with pytest.raises(ValueError, match=r"rank 4, got shape"):
    SparseKernel.from_dense(kernel)


def test_from_dense_bad_layout_and_dtype():
  kernel = np.ones((3, 3, 2, 2), np.float32)
  with pytest.raises(ValueError, match=r"layout must be one of"):
    SparseKernel.from_dense(kernel, layout="HWOI")
  with pytest.raises(TypeError, match=r"floating point, got int32"):
    SparseKernel.from_dense(kernel.astype(np.int32))


def test_from_mask_shape_mismatch():
  kernel = np.ones((3, 3, 2, 2), np.float32)
  with pytest.raises(ValueError, match=r"mask shape .* does not match"):
    SparseKernel.from_mask(kernel, np.ones((3, 3, 2, 3), bool))


def test_sparse_kernel_needs_a_structure():
  with pytest.raises(TypeError, match=r"structure must be a SparseStructure"):
    SparseKernel(jnp.ones(3), "not a structure")



@pytest.mark.parametrize("method", ["escort", "dense", "auto"])
def test_narrowing_preferred_element_type_is_rejected_by_every_method(
    problem, method):
  # Regression: "escort" used to return bfloat16 silently where "dense"
  # failed inside lax; as in lax, preferred_element_type may only widen.
  x, sk, _ = problem
  with pytest.raises(ValueError, match=r"preferred_element_type=bfloat16 "
                     r"is narrower than the inputs' float32"):
    sparse_conv(x, sk, preferred_element_type=jnp.bfloat16, method=method)
  y = sparse_conv(x.astype(jnp.bfloat16), sk.with_values(
      sk.values.astype(jnp.bfloat16)), preferred_element_type=jnp.float32,
                  method=method)
  assert y.dtype == jnp.float32
