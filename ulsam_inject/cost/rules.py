"""Cost rules: one small pure function per op kind, in tables keyed by op.

A rule has the signature ``rule(node, inputs, output, module) -> (macs, other_ops)``:

- ``node`` is the fx node (for its keyword arguments: use :func:`arg`);
- ``inputs`` are its positional arguments with every fx node replaced by that node's
  ``meta["value"]`` (meta tensors: shapes and dtypes, no data);
- ``output`` is the node's own ``meta["value"]``;
- ``module`` is the called submodule for ``call_module`` nodes, else None.

Rules live in three tables, as in fvcore's ``jit_handles``: :data:`MODULE_RULES` (keyed by
module class; subclasses inherit their base's rule), :data:`FUNCTION_RULES` (keyed by the
function object fx records) and :data:`METHOD_RULES` (keyed by Tensor method name; in-place
``name_`` uses ``name``'s rule). An op without a rule is never counted as zero: the walk in
:mod:`ulsam_inject.cost.count` reports it as uncounted. A rule raises :class:`NoRule` for a
variant it cannot count (an einsum of three operands, ...).

Conventions (counts are exact for the shapes a node saw; ``count`` traces at batch 1):

=======================================  =====================================================
op kind                                  rule
=======================================  =====================================================
convolution (1d/2d/3d, grouped,          MACs: output elements x (in_channels / groups) x
depthwise; module or functional)         kernel elements. Transposed: input elements x
                                         (out_channels / groups) x kernel elements (the
                                         convention of ``torch.utils.flop_counter``).
                                         Bias: 1 other op per output element.
linear / matmul / mm / bmm / einsum      MACs: output elements x contracted size (einsum of two
                                         operands: product of the sizes of all its indices).
addmm / baddbmm / linear bias            plus 1 other op per output element (the add).
scaled_dot_product_attention             MACs: B x L x S x (E + Ev); other: 5 x B x L x S
                                         (scale, softmax 3, mask/bias 1).
nn.MultiheadAttention                    MACs: in-projections, Q K^T, A V, out-projection; other:
                                         biases, scaling, softmax (3 per score), head average.
elementwise arithmetic (add, sub, mul,   1 op per output element (addcmul / addcdiv: 2).
div, neg, pow, sqrt, exp, clamp, ...)
activations (relu, relu6, leaky_relu,    1 op per output element, whatever the formula inside
hardswish, hardsigmoid, sigmoid, silu,   (hardswish is x * relu6(x + 3) / 6: still 1).
gelu, tanh, elu, mish, softplus, ...)
max pool, window K elements              K - 1 comparisons per output element (windows are
                                         counted full at padded borders).
avg pool, window K elements              K per output element (K - 1 adds and 1 scale).
adaptive pools                           exact window sizes (PyTorch's start/end formula): avg:
                                         sum of window sizes (= input elements when windows
                                         tile the input, e.g. global pooling); max: that minus
                                         output elements.
mean / sum / amax / ... reductions       1 op per input element.
softmax / log_softmax                    3 per element (exp, sum, divide; the max subtraction
                                         for stability is not counted).
normalize (L2)                           3 per element (square, sum, divide).
cumsum / cumprod                         1 per element.
interpolate / Upsample                   per output element: nearest 0 (a copy); linear,
                                         bilinear, trilinear 3 per lerp, 2^d - 1 lerps (3, 9,
                                         21); bicubic 31 (16 taps: 16 multiplies, 15 adds);
                                         area: as adaptive avg pooling.
batch norm (eval)                        2 per element: a per-channel scale and shift.
layer / group / instance norm            5 per element (mean, subtract, square, sum, scale by
                                         1/std) + 1 per element for each of weight and bias.
cat / stack / pad / roll / contiguous /  0 ops: data movement only (their bytes count).
clone / gather-style indexing
view / reshape / flatten / permute /     0 ops and 0 bytes: views, see :func:`moves_data`.
transpose / expand / (un)squeeze /
chunk / split / getitem / Identity
dropout / stochastic depth               0 ops and 0 bytes: the identity in eval mode.
ULSAM (a leaf)                           see :func:`ulsam_rule`: 2CHW MACs, 14CHW + 7gHW other.
=======================================  =====================================================

Example:
    >>> import torch
    >>> from torch import nn
    >>> rule = MODULE_RULES[nn.Conv2d]
    >>> conv = nn.Conv2d(8, 16, 3, padding=1)
    >>> x, y = torch.empty(1, 8, 5, 5, device="meta"), torch.empty(1, 16, 5, 5, device="meta")
    >>> rule(None, (x,), y, conv)  # 400 outputs x 8 x 9 MACs; 400 bias adds
    (28800, 400)
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.utils._pytree import tree_leaves

from ulsam_inject.block.module import ULSAM

Rule = Callable[[Any, tuple[Any, ...], Any, "nn.Module | None"], tuple[int, int]]
"""``rule(node, inputs, output, module) -> (macs, other_ops)``."""

MODULE_RULES: dict[type[nn.Module], Rule] = {}
FUNCTION_RULES: dict[Callable[..., Any], Rule] = {}
METHOD_RULES: dict[str, Rule] = {}


class NoRule(Exception):
    """Raised by a rule for a variant of its op that it cannot count.

    Part of the rule protocol, never seen by users: the walk catches it and reports the op
    as uncounted.
    """


def register(*keys: type[nn.Module] | Callable[..., Any] | str) -> Callable[[Rule], Rule]:
    """Register a rule for module classes, functions and/or Tensor method names.

    Example:
        >>> @register("my_method")
        ... def my_rule(node, inputs, output, module):
        ...     return 0, numel(output)
        >>> METHOD_RULES["my_method"] is my_rule
        True
        >>> del METHOD_RULES["my_method"]
    """

    def add(rule: Rule) -> Rule:
        for key in keys:
            if isinstance(key, str):
                METHOD_RULES[key] = rule
            elif isinstance(key, type) and issubclass(key, nn.Module):
                MODULE_RULES[key] = rule
            else:
                FUNCTION_RULES[key] = rule
        return rule

    return add


def module_rule(module: nn.Module) -> Rule | None:
    """The rule for ``module``'s class or its nearest registered base class."""
    for cls in type(module).__mro__:
        if cls is nn.Module:
            return None
        rule = MODULE_RULES.get(cls)
        if rule is not None:
            return rule
    return None


def method_rule(name: str) -> Rule | None:
    """The rule for a Tensor method; ``name_`` (in place) falls back to ``name``."""
    rule = METHOD_RULES.get(name)
    if rule is None and name.endswith("_") and not name.endswith("__"):
        rule = METHOD_RULES.get(name[:-1])
    return rule


# -- helpers --------------------------------------------------------------------------


def tensors(value: Any) -> list[torch.Tensor]:
    """The tensors in a (nested) value."""
    return [v for v in tree_leaves(value) if isinstance(v, torch.Tensor)]


def numel(value: Any) -> int:
    """Elements of all tensors in ``value``."""
    return sum(t.numel() for t in tensors(value))


def nbytes(value: Any) -> int:
    """Bytes of all tensors in ``value`` (dtype-aware)."""
    return sum(t.numel() * t.element_size() for t in tensors(value))


def arg(node: fx.Node | None, inputs: Sequence[Any], index: int, name: str, default: Any) -> Any:
    """Argument ``index`` (positional) or ``name`` (keyword) of a call, with nodes resolved."""
    if index < len(inputs):
        return inputs[index]
    if node is None or name not in node.kwargs:
        return default
    value = node.kwargs[name]
    return fx.node.map_arg(value, lambda n: n.meta.get("value"))


def _first_tensor(inputs: Sequence[Any]) -> torch.Tensor:
    found = tensors(inputs[:1]) or tensors(inputs)
    if not found:
        raise NoRule("no tensor input")
    return found[0]


def _kernel_elements(kernel: int | Sequence[int], dims: int) -> int:
    if isinstance(kernel, int):
        return kernel**dims
    return math.prod(kernel)


# -- convolution, linear, matrix products ----------------------------------------------


def _conv_macs(
    inputs_x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, transposed: bool
) -> int:
    # weight: (out, in/groups, *k) or, transposed, (in, out/groups, *k): in both layouts
    # dim 1 is the fan of one output (resp. input) element, as in torch.utils.flop_counter.
    per_element = weight.shape[1] * math.prod(weight.shape[2:])
    return (inputs_x.numel() if transposed else out.numel()) * per_element


@register(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def conv_module_rule(
    node: Any, inputs: tuple[Any, ...], output: Any, module: Any
) -> tuple[int, int]:
    """Convolution module: MACs from the weight's shape; bias: 1 add per output element."""
    x, out = _first_tensor(inputs), tensors(output)[0]
    bias = numel(output) if module.bias is not None else 0
    return _conv_macs(x, module.weight, out, transposed=False), bias


@register(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
def conv_transpose_module_rule(
    node: Any, inputs: tuple[Any, ...], output: Any, module: Any
) -> tuple[int, int]:
    """Transposed convolution module: input elements x (out/groups) x kernel MACs."""
    x, out = _first_tensor(inputs), tensors(output)[0]
    bias = numel(output) if module.bias is not None else 0
    return _conv_macs(x, module.weight, out, transposed=True), bias


def _conv_function_rule(transposed: bool) -> Rule:
    def rule(node: Any, inputs: tuple[Any, ...], output: Any, module: Any) -> tuple[int, int]:
        x = arg(node, inputs, 0, "input", None)
        weight = arg(node, inputs, 1, "weight", None)
        bias = arg(node, inputs, 2, "bias", None)
        if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
            raise NoRule("convolution without tensor input and weight")
        out = tensors(output)[0]
        adds = numel(output) if isinstance(bias, torch.Tensor) else 0
        return _conv_macs(x, weight, out, transposed), adds

    return rule


register(F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d)(
    _conv_function_rule(transposed=False)
)
register(
    F.conv_transpose1d,
    F.conv_transpose2d,
    F.conv_transpose3d,
    torch.conv_transpose1d,
    torch.conv_transpose2d,
    torch.conv_transpose3d,
)(_conv_function_rule(transposed=True))


@register(nn.Linear)
def linear_module_rule(
    node: Any, inputs: tuple[Any, ...], output: Any, module: Any
) -> tuple[int, int]:
    """Linear module: output elements x in_features MACs; bias: 1 add per output element."""
    bias = numel(output) if module.bias is not None else 0
    return numel(output) * module.weight.shape[-1], bias


@register(F.linear, torch._C._nn.linear)
def linear_function_rule(
    node: Any, inputs: tuple[Any, ...], output: Any, module: Any
) -> tuple[int, int]:
    """``F.linear(x, weight, bias)``."""
    weight = arg(node, inputs, 1, "weight", None)
    bias = arg(node, inputs, 2, "bias", None)
    if not isinstance(weight, torch.Tensor):
        raise NoRule("linear without a tensor weight")
    adds = numel(output) if isinstance(bias, torch.Tensor) else 0
    return numel(output) * weight.shape[-1], adds


def _contracted(a: torch.Tensor) -> int:
    # matmul contracts a's last dim (its only dim when a is 1-D).
    return a.shape[-1] if a.dim() > 0 else 1


@register(torch.matmul, torch.mm, torch.bmm, operator.matmul, "matmul", "mm", "bmm", "__matmul__")
def matmul_rule(node: Any, inputs: tuple[Any, ...], output: Any, module: Any) -> tuple[int, int]:
    """Matrix products (broadcast included): output elements x contracted size MACs."""
    a = arg(node, inputs, 0, "input", None)
    if not isinstance(a, torch.Tensor):
        raise NoRule("matmul without a tensor left operand")
    return numel(output) * _contracted(a), 0


@register(torch.addmm, torch.baddbmm, torch.addbmm, "addmm", "baddbmm")
def addmm_rule(node: Any, inputs: tuple[Any, ...], output: Any, module: Any) -> tuple[int, int]:
    """``addmm(c, a, b)`` / ``baddbmm``: the product's MACs plus 1 add per output element."""
    a = arg(node, inputs, 1, "mat1", None)
    if not isinstance(a, torch.Tensor):
        a = arg(node, inputs, 1, "batch1", None)
    if not isinstance(a, torch.Tensor):
        raise NoRule("addmm without tensor operands")
    if a.dim() == 3 and numel(output) and tensors(output)[0].dim() == 2:
        # addbmm sums the batch of products into one matrix.
        return numel(output) * a.shape[0] * a.shape[-1], numel(output)
    return numel(output) * a.shape[-1], numel(output)


def einsum_macs(equation: str, operands: Sequence[torch.Tensor]) -> int:
    """MACs of a two-operand einsum: the product of the sizes of all its indices.

    Example:
        >>> a, b = torch.empty(2, 3, device="meta"), torch.empty(3, 4, device="meta")
        >>> einsum_macs("ij,jk->ik", [a, b])
        24
    """
    equation = equation.replace(" ", "")
    lhs = equation.split("->")[0]
    terms = lhs.split(",")
    if len(terms) != 2 or len(operands) != 2:
        raise NoRule(f"einsum with {len(terms)} operands")
    sizes: dict[str, int] = {}
    ellipsis: list[int] = []
    for term, operand in zip(terms, operands):
        shape = list(operand.shape)
        if "..." in term:
            head, tail = term.split("...")
            middle = shape[len(head) : len(shape) - len(tail)]
            # broadcast the ellipsis dims of the two operands, aligned on the right
            padded = [1] * (len(middle) - len(ellipsis)) + ellipsis
            middle = [1] * (len(padded) - len(middle)) + middle
            ellipsis = [max(p, m) for p, m in zip(padded, middle)]
            letters = head + tail
            shape = shape[: len(head)] + shape[len(shape) - len(tail) :]
        else:
            letters = term
        for letter, size in zip(letters, shape):
            sizes[letter] = max(sizes.get(letter, 1), size)
    return math.prod(sizes.values()) * math.prod(ellipsis)


@register(torch.einsum)
def einsum_rule(node: Any, inputs: tuple[Any, ...], output: Any, module: Any) -> tuple[int, int]:
    """``torch.einsum``: two operands exact (a contraction); one operand is a sum."""
    equation = inputs[0]
    operands = list(inputs[1:])
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    if not isinstance(equation, str) or not all(isinstance(o, torch.Tensor) for o in operands):
        raise NoRule("einsum without an equation and tensor operands")
    if len(operands) == 1:
        return 0, operands[0].numel()
    return einsum_macs(equation, operands), 0


@register(F.scaled_dot_product_attention)
def sdpa_rule(node: Any, inputs: tuple[Any, ...], output: Any, module: Any) -> tuple[int, int]:
    """Scaled dot-product attention: Q K^T and A V MACs; scale, softmax and mask other ops."""
    q = arg(node, inputs, 0, "query", None)
    k = arg(node, inputs, 1, "key", None)
    v = arg(node, inputs, 2, "value", None)
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        raise NoRule("attention without tensor q, k, v")
    scores = math.prod(q.shape[:-1]) * k.shape[-2]
    return scores * (q.shape[-1] + v.shape[-1]), 5 * scores


@register(nn.MultiheadAttention)
def multihead_attention_rule(
    node: Any, inputs: tuple[Any, ...], output: Any, module: Any
) -> tuple[int, int]:
    """``nn.MultiheadAttention``: projections and attention MACs, exact for its options."""
    query = arg(node, inputs, 0, "query", None)
    key = arg(node, inputs, 1, "key", None)
    if not isinstance(query, torch.Tensor) or not isinstance(key, torch.Tensor):
        raise NoRule("attention without tensor query and key")
    embed, heads = module.embed_dim, module.num_heads
    if query.dim() == 3:
        batch = query.shape[0] if module.batch_first else query.shape[1]
        target = query.shape[1] if module.batch_first else query.shape[0]
        source = key.shape[1] if module.batch_first else key.shape[0]
    else:
        batch, target, source = 1, query.shape[0], key.shape[0]
    projections = batch * (target * embed + source * module.kdim + source * module.vdim) * embed
    # bias_k / add_zero_attn each append one key position
    source += int(module.bias_k is not None) + int(module.add_zero_attn)
    scores = batch * heads * target * source
    macs = projections + 2 * scores * (embed // heads) + batch * target * embed * embed
    other = batch * target * embed  # q scaling
    if module.in_proj_bias is not None:
        other += batch * (target + 2 * source) * embed
    if module.out_proj.bias is not None:
        other += batch * target * embed
    other += 3 * scores  # softmax
    if arg(node, inputs, 4, "need_weights", True) and arg(
        node, inputs, 6, "average_attn_weights", True
    ):
        other += scores  # mean over heads
    for index, name in ((3, "key_padding_mask"), (5, "attn_mask")):
        if isinstance(arg(node, inputs, index, name, None), torch.Tensor):
            other += scores
    return macs, other


# -- elementwise, activations, reductions ----------------------------------------------


def _words(text: str) -> list[str]:
    return text.split()


def _per_output(ops: int) -> Rule:
    def rule(node: Any, inputs: tuple[Any, ...], output: Any, module: Any) -> tuple[int, int]:
        return 0, ops * numel(output)

    rule.__doc__ = f"{ops} op(s) per output element."
    return rule


def _per_input(node: Any, inputs: tuple[Any, ...], output: Any, module: Any) -> tuple[int, int]:
    return 0, numel(_first_tensor(inputs))


def _zero(node: Any, inputs: tuple[Any, ...], output: Any, module: Any) -> tuple[int, int]:
    return 0, 0


_ELEMENTWISE = _words(
    "add sub rsub mul div true_divide floor_divide remainder fmod neg reciprocal pow sqrt "
    "rsqrt exp exp2 expm1 log log2 log10 log1p abs sign clamp clamp_min clamp_max clip "
    "maximum minimum where lerp sin cos square round floor ceil trunc eq ne lt le gt ge "
    "logical_not logical_and logical_or bitwise_and bitwise_or bitwise_not masked_fill erf "
    "cumsum cumprod"
)
_ACTIVATIONS = _words(
    "relu relu6 leaky_relu prelu rrelu elu selu celu gelu silu mish sigmoid tanh "
    "hardswish hardsigmoid hardtanh softplus softsign logsigmoid tanhshrink threshold "
    "hardshrink softshrink glu"
)
_OPERATORS = _words(
    "add sub mul truediv floordiv mod pow neg invert matmul iadd isub imul itruediv eq ne lt le "
    "gt ge and_ or_"
)


def _named(names: Iterable[str], *sources: Any) -> list[Callable[..., Any]]:
    found = []
    for name in names:
        for source in sources:
            for variant in (name, name + "_"):
                fn = getattr(source, variant, None)
                if callable(fn) and not isinstance(fn, type):
                    found.append(fn)
    return found


_one = _per_output(1)
register(
    *_ELEMENTWISE, *_ACTIVATIONS, *_named(_ELEMENTWISE + _ACTIVATIONS, torch, F, torch.special)
)(_one)
register(*[getattr(operator, n) for n in _OPERATORS if n != "matmul"])(_one)
register(*[f"__{n}__" for n in ("add", "sub", "mul", "truediv", "radd", "rsub", "rmul", "neg")])(
    _one
)
register(torch.addcmul, torch.addcdiv, "addcmul", "addcdiv")(_per_output(2))
register(
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
    nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh,
    nn.Softplus, nn.Softsign, nn.LogSigmoid, nn.Tanhshrink, nn.Threshold, nn.Hardshrink,
    nn.Softshrink, nn.GLU,
)(_one)  # fmt: skip

_REDUCTIONS = _words("mean sum amax amin max min prod std var norm logsumexp")
register(*_REDUCTIONS, *_named(_REDUCTIONS, torch))(_per_input)

register(nn.Softmax, nn.LogSoftmax, nn.Softmin, "softmax", "log_softmax")(_per_output(3))
register(F.normalize)(_per_output(3))
register(*_named(["softmax", "log_softmax", "softmin"], torch, F, torch.special))(_per_output(3))


# -- normalization ----------------------------------------------------------------------


@register(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
def batch_norm_rule(
    node: Any, inputs: tuple[Any, ...], output: Any, module: Any
) -> tuple[int, int]:
    """Batch norm in eval: a per-channel scale and shift, 2 ops per element."""
    return 0, 2 * numel(output)


register(F.batch_norm, torch.batch_norm)(batch_norm_rule)


def _norm_ops(elements: int, weight: Any, bias: Any) -> int:
    affine = int(isinstance(weight, torch.Tensor)) + int(isinstance(bias, torch.Tensor))
    return (5 + affine) * elements


@register(nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
def norm_module_rule(
    node: Any, inputs: tuple[Any, ...], output: Any, module: Any
) -> tuple[int, int]:
    """Layer / group / instance norm: 5 ops per element, + 1 each for weight and bias."""
    return 0, _norm_ops(
        numel(output), getattr(module, "weight", None), getattr(module, "bias", None)
    )


def _norm_function_rule(weight_index: int) -> Rule:
    """The functional norms' rule: as the modules', with ``weight`` and ``bias`` read from
    positions ``weight_index`` and ``weight_index + 1`` (or the keywords)."""

    def rule(node: Any, inputs: tuple[Any, ...], output: Any, module: Any) -> tuple[int, int]:
        weight = arg(node, inputs, weight_index, "weight", None)
        bias = arg(node, inputs, weight_index + 1, "bias", None)
        return 0, _norm_ops(numel(output), weight, bias)

    return rule


# F.layer_norm(x, shape, weight, bias, eps) and F.group_norm(x, groups, weight, bias, eps);
# F.instance_norm(x, running_mean, running_var, weight, bias, ...).
register(F.layer_norm, torch.layer_norm, F.group_norm, torch.group_norm)(_norm_function_rule(2))
register(F.instance_norm, torch.instance_norm)(_norm_function_rule(3))


# -- pooling ------------------------------------------------------------------------------


def _pool_rule(dims: int, is_max: bool, *, functional: bool) -> Rule:
    def rule(node: Any, inputs: tuple[Any, ...], output: Any, module: Any) -> tuple[int, int]:
        kernel = module.kernel_size if not functional else arg(node, inputs, 1, "kernel_size", None)
        if kernel is None:
            raise NoRule("pooling without a kernel size")
        window = _kernel_elements(kernel, dims)
        # the first output of max_pool(return_indices=True) holds the values
        out = numel(tensors(output)[:1])
        return 0, (window - 1 if is_max else window) * out

    return rule


for _dims in (1, 2, 3):
    _max_module = getattr(nn, f"MaxPool{_dims}d")
    _avg_module = getattr(nn, f"AvgPool{_dims}d")
    register(_max_module)(_pool_rule(_dims, True, functional=False))
    register(_avg_module)(_pool_rule(_dims, False, functional=False))
    register(*_named([f"max_pool{_dims}d", f"max_pool{_dims}d_with_indices"], F, torch))(
        _pool_rule(_dims, True, functional=True)
    )
    register(*_named([f"avg_pool{_dims}d"], F, torch, torch._C._nn))(
        _pool_rule(_dims, False, functional=True)
    )


def adaptive_window_elements(in_size: Sequence[int], out_size: Sequence[int]) -> int:
    """Sum over the output positions of an adaptive pool of its window sizes (one plane).

    PyTorch's window ``i`` along a dim of input ``n`` and output ``m`` spans
    ``floor(i n / m)`` to ``ceil((i + 1) n / m)``.

    Example:
        >>> adaptive_window_elements((7, 7), (1, 1)), adaptive_window_elements((5,), (3,))
        (49, 7)
    """
    total = 1
    for n, m in zip(in_size, out_size):
        total *= sum(-((-(i + 1) * n) // m) - (i * n) // m for i in range(m))
    return total


def _adaptive_rule(dims: int, is_max: bool) -> Rule:
    def rule(node: Any, inputs: tuple[Any, ...], output: Any, module: Any) -> tuple[int, int]:
        x = _first_tensor(inputs)
        out = tensors(output)[0]
        planes = math.prod(x.shape[:-dims])
        window = planes * adaptive_window_elements(x.shape[-dims:], out.shape[-dims:])
        return 0, window - out.numel() if is_max else window

    return rule


for _dims in (1, 2, 3):
    for _is_max, _kind in ((True, "Max"), (False, "Avg")):
        register(
            getattr(nn, f"Adaptive{_kind}Pool{_dims}d"),
            *_named(
                [
                    f"adaptive_{_kind.lower()}_pool{_dims}d",
                    f"adaptive_{_kind.lower()}_pool{_dims}d_with_indices",
                ],
                F,
                torch,
                torch._C._nn,
            ),
        )(_adaptive_rule(_dims, _is_max))


_INTERPOLATION_OPS = {"linear": 3, "bilinear": 9, "trilinear": 21, "bicubic": 31}


def _interpolation_rule(mode: str, inputs: tuple[Any, ...], output: Any) -> tuple[int, int]:
    if mode.startswith("nearest"):
        return 0, 0
    if mode == "area":
        x = _first_tensor(inputs)
        out = tensors(output)[0]
        dims = x.dim() - 2
        planes = math.prod(x.shape[:-dims])
        return 0, planes * adaptive_window_elements(x.shape[-dims:], out.shape[-dims:])
    if mode not in _INTERPOLATION_OPS:
        raise NoRule(f"interpolation mode {mode!r}")
    return 0, _INTERPOLATION_OPS[mode] * numel(output)


@register(F.interpolate, F.upsample)
def interpolate_rule(
    node: Any, inputs: tuple[Any, ...], output: Any, module: Any
) -> tuple[int, int]:
    """``F.interpolate``: by mode, per output element (see the table)."""
    return _interpolation_rule(arg(node, inputs, 3, "mode", "nearest"), inputs, output)


@register(nn.Upsample)
def upsample_rule(node: Any, inputs: tuple[Any, ...], output: Any, module: Any) -> tuple[int, int]:
    """``nn.Upsample`` (and its Nearest / Bilinear subclasses)."""
    return _interpolation_rule(module.mode, inputs, output)


# -- data movement and views ---------------------------------------------------------------

VIEW_METHODS = frozenset(
    _words(
        "view view_as reshape reshape_as flatten unflatten squeeze unsqueeze permute "
        "transpose t expand expand_as narrow select chunk split tensor_split unbind movedim "
        "moveaxis swapaxes swapdims detach unfold as_strided diagonal T mT"
    )
)
"""Tensor methods (and torch functions of the same name) that return views: 0 ops, 0 bytes."""

VIEW_FUNCTIONS: frozenset[Callable[..., Any]] = frozenset(
    [operator.getitem, getattr, *_named(VIEW_METHODS, torch)]
)
VIEW_MODULES: tuple[type[nn.Module], ...] = (nn.Identity, nn.Flatten, nn.Unflatten)

_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_DROPOUT_FUNCTIONS = _named(
    ["dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout"],
    F,
    torch,
)

register(*VIEW_METHODS, *VIEW_FUNCTIONS, *VIEW_MODULES, *_DROPOUT_MODULES, *_DROPOUT_FUNCTIONS)(
    _zero
)

_MOVES = _words(
    "cat concat concatenate stack hstack vstack contiguous clone pad roll flip repeat "
    "repeat_interleave tile index_select gather take to float half double bfloat16 type "
    "type_as channel_shuffle pixel_shuffle pixel_unshuffle tril triu new_zeros new_ones "
    "new_empty zeros_like ones_like empty_like"
)
_FACTORIES = _words(
    "zeros ones empty full arange linspace eye rand randn randint zeros_like ones_like "
    "empty_like full_like rand_like randn_like tensor as_tensor"
)
register(*_named(_FACTORIES, torch))(_zero)  # they write their output, computing nothing
register(
    *_MOVES,
    *_named(_MOVES, torch, F),
    nn.ChannelShuffle,
    nn.PixelShuffle,
    nn.PixelUnshuffle,
    nn.ZeroPad1d,
    nn.ZeroPad2d,
    nn.ZeroPad3d,
    nn.ConstantPad1d,
    nn.ConstantPad2d,
    nn.ConstantPad3d,
    nn.ReflectionPad1d,
    nn.ReflectionPad2d,
    nn.ReplicationPad1d,
    nn.ReplicationPad2d,
    nn.Embedding,
    F.embedding,
)(_zero)

_IDENTITY_IN_EVAL: list[Callable[..., Any]] = list(_DROPOUT_FUNCTIONS)
_IDENTITY_MODULES: list[type[nn.Module]] = list(_DROPOUT_MODULES)
try:  # torchvision's stochastic depth is fx-wrapped: one call, the identity in eval
    from torchvision.ops import StochasticDepth, stochastic_depth

    register(stochastic_depth, StochasticDepth)(_zero)
    _IDENTITY_IN_EVAL.append(stochastic_depth)
    _IDENTITY_MODULES.append(StochasticDepth)
except ImportError:  # pragma: no cover - torchvision is a dependency
    pass


def moves_data(node: fx.Node, inputs: Sequence[Any], output: Any, module: nn.Module | None) -> bool:
    """Whether the op reads its inputs and writes its output, or is a view / eval identity.

    Views (``view``, ``reshape``, ``flatten``, ``permute``, ``transpose``, ``expand``,
    ``(un)squeeze``, ``chunk``, ``split``, basic ``getitem``, ``Identity``, ``Flatten``) and
    dropout / stochastic depth (the identity in eval) move no bytes. ``reshape`` is taken
    as a view: the meta values carry no strides, so a copy for a non-contiguous input
    cannot be seen; ``contiguous`` is always counted as a copy. ``to`` / ``type_as`` copy
    only when the dtype changes. ``getitem`` with a tensor or list index gathers (copies).
    """
    if module is not None:
        return not isinstance(module, (*VIEW_MODULES, *_IDENTITY_MODULES))
    target = node.target
    if node.op == "call_method":
        name = str(target)
        if name in ("to", "type_as", "float", "half", "double", "bfloat16", "type"):
            before = tensors(inputs[:1])
            after = tensors(output)
            return bool(before and after and before[0].dtype != after[0].dtype)
        return name not in VIEW_METHODS
    if target is operator.getitem:
        index = inputs[1] if len(inputs) > 1 else None
        advanced = isinstance(index, (torch.Tensor, list)) or (
            isinstance(index, tuple) and any(isinstance(i, (torch.Tensor, list)) for i in index)
        )
        return isinstance(inputs[0], torch.Tensor) and advanced
    return target not in VIEW_FUNCTIONS and target not in _IDENTITY_IN_EVAL


# -- ULSAM ---------------------------------------------------------------------------------


@register(ULSAM)
def ulsam_rule(node: Any, inputs: tuple[Any, ...], output: Any, module: Any) -> tuple[int, int]:
    """ULSAM on an N x C x H x W input with g groups, counted from its structure.

    MACs: 2NCHW (depthwise 1x1 conv: NCHW; grouped pointwise C -> g: NCHW).

    Other ops, per the table above:

    - over NCHW: depthwise conv bias 1, BN 2, ReLU 1, 3x3 max pool 8, multiply and add 2:
      14 NCHW;
    - over NgHW: pointwise conv bias 1, BN 2, ReLU 1, softmax 3: 7 NgHW.

    Example:
        >>> import torch
        >>> x = torch.empty(1, 64, 14, 14, device="meta")
        >>> ulsam_rule(None, (x,), x, ULSAM(64, groups=4))
        (25088, 181104)
    """
    x = _first_tensor(inputs)
    elements = x.numel()
    maps = elements // module.channels * module.groups
    return 2 * elements, 14 * elements + 7 * maps
