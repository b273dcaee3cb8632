// normzoo's fused layers as PyTorch operators with their autograd in C++ (torch.ops.normzoo.*).
//
// The same work as the Python autograd ops of the fused layers (normzoo.channel_norm's _GroupFn and _BatchFn,
// normzoo.row_norm's _RowNormFn, and the native ops of Switchable and Batch-Instance Norm, FRN and EvoNorm): one call
// into the C kernels each way, on the kernels' own statistics block. Written here so that
// a layer's step runs no Python between its forward and its backward: the engine calls a C++ node, not a Python
// one, and the allocations and argument checks are C++ calls. Built and loaded by normzoo.native_ops, which
// hands over the kernels' addresses (bind); the Python ops remain where this cannot be built.
//
// Conventions, as the Python ops: affine parameters go to the kernels as a pointer and a type code (float32 1,
// float64 2, bfloat16 3; any other dtype, or a non-contiguous parameter, as a contiguous copy in the input's
// arithmetic type: float64 for float64 input, float32 otherwise), their gradients come back in the parameter's
// dtype and shape. The backward is first-order only: under create_graph its results refuse a second derivative
// with the message of torch.autograd.function.once_differentiable.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/library.h>

#include <array>
#include <optional>

namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptionalTensor = c10::optional<Tensor>;  // (std::optional in newer torch, its own type before 2.4)

// ---- the kernels, by dtype (index 0 float32, 1 float64, 2 bfloat16), as normzoo.native declares them ----
typedef void (*group_fwd_t)(const void *, void *, int64_t, int64_t, int64_t, int64_t, int, const void *, int,
                            const void *, int, const void *, int, double, int, double *, double *, double *, int);
typedef void (*group_bwd_t)(const void *, const void *, void *, int64_t, int64_t, int64_t, int64_t, int, const void *,
                            int, const void *, int, const void *, int, int, const double *, const double *, void *,
                            void *, void *, double *, int);
typedef void (*batch_fwd_t)(const void *, void *, int64_t, int64_t, int64_t, int, const void *, int, const void *, int,
                            double, int, double *, double *, double *, void *, void *, int, double, double *, double,
                            double, double, const double *, double *, int);
typedef void (*batch_bwd_t)(const void *, const void *, void *, int64_t, int64_t, int64_t, int, const void *, int,
                            const double *, const double *, int, double, const double *, void *, void *, int, int,
                            int);
typedef void (*batch_fixed_fwd_t)(const void *, void *, int64_t, int64_t, int64_t, int, const void *, int, const void *,
                                  int, const void *, int, const void *, int, double, int, double *, int);
typedef void (*row_fwd_t)(const void *, void *, int64_t, int64_t, const void *, int, const void *, int, double, int,
                          double *, double *, int);
typedef void (*row_bwd_t)(const void *, const void *, void *, int64_t, int64_t, const void *, int, int,
                          const double *, const double *, void *, void *, int, int);
typedef void (*switch_fwd_t)(const void *, void *, int64_t, int64_t, int64_t, int, const void *, int, const void *,
                             int, void *, void *, int, int, double, const void *, int, const void *, int, double,
                             double *, int);
typedef void (*switch_bwd_t)(const void *, const void *, void *, int64_t, int64_t, int64_t, int, int, const void *, int,
                             const double *, void *, int, void *, int, void *, int, void *, int, int);
typedef void (*bin_fwd_t)(const void *, void *, int64_t, int64_t, int64_t, int, const void *, int, void *, void *, int,
                          int, double, const void *, int, const void *, int, double, double *, int);
typedef void (*bin_bwd_t)(const void *, const void *, void *, int64_t, int64_t, int64_t, int, int, const void *, int,
                          const double *, void *, int, void *, int, void *, int, int);
typedef int64_t (*keep_size_t)(int64_t, int64_t);
typedef void (*s0_fwd_t)(const void *, void *, int64_t, int64_t, int64_t, int64_t, int, const void *, const void *,
                         const void *, int, double, double *, double *, int);
typedef void (*s0_bwd_t)(const void *, const void *, void *, int64_t, int64_t, int64_t, int64_t, int, const void *,
                         const void *, int, const double *, const double *, void *, void *, void *, int);
typedef void (*b0_fwd_t)(const void *, void *, int64_t, int64_t, int64_t, int, const void *, const void *, const void *,
                         int, double, void *, int, int, double, double *, int);
typedef void (*b0_bwd_t)(const void *, const void *, void *, int64_t, int64_t, int64_t, int, const void *, const void *,
                         int, const double *, int, void *, void *, void *, int);
typedef double (*window_merge_t)(int64_t, int64_t, int, const void *, const void *, const void *, double *, double *);
typedef void (*window_record_t)(int64_t, int64_t, int, void *, void *, void *, double, const double *, const double *,
                                double *);
typedef void (*wake_t)(void);

struct Kernels {
    std::array<group_fwd_t, 3> group_fwd{};
    std::array<group_bwd_t, 3> group_bwd{};
    std::array<batch_fwd_t, 3> batch_fwd{};
    std::array<batch_bwd_t, 3> batch_bwd{};
    std::array<row_fwd_t, 3> row_fwd{};
    std::array<row_bwd_t, 3> row_bwd{};
    std::array<switch_fwd_t, 3> switch_fwd{};
    std::array<switch_bwd_t, 3> switch_bwd{};
    std::array<bin_fwd_t, 3> bin_fwd{};
    std::array<bin_bwd_t, 3> bin_bwd{};
    std::array<s0_fwd_t, 3> s0_fwd{};
    std::array<s0_bwd_t, 3> s0_bwd{};
    std::array<b0_fwd_t, 3> b0_fwd{};
    std::array<b0_bwd_t, 3> b0_bwd{};
    std::array<batch_fixed_fwd_t, 3> batch_fixed_fwd{};
    window_merge_t window_merge = nullptr;
    window_record_t window_record = nullptr;
    wake_t wake = nullptr;
    keep_size_t switch_keep_size = nullptr, bin_keep_size = nullptr;
    int64_t parallel_threshold = 1 << 16;
    bool bound = false;
};
Kernels k;

// bind(addresses, parallel_threshold): the kernels' addresses in the order above (each family float32, float64,
// bfloat16), then those of nz_window_merge, nz_window_record, nz_pool_wake, nz_switch_keep_size and nz_bin_keep_size.
constexpr size_t kFamilies = 15;
void bind(at::IntArrayRef addresses, int64_t parallel_threshold) {
    TORCH_CHECK(addresses.size() == 3 * kFamilies + 5, "normzoo::bind: expected ", 3 * kFamilies + 5,
                " kernel addresses, got ", addresses.size());
    auto at_ = [&](size_t i) { return reinterpret_cast<void *>(static_cast<intptr_t>(addresses[i])); };
    for (size_t d = 0; d < 3; d++) {
        k.group_fwd[d] = reinterpret_cast<group_fwd_t>(at_(d));
        k.group_bwd[d] = reinterpret_cast<group_bwd_t>(at_(3 + d));
        k.batch_fwd[d] = reinterpret_cast<batch_fwd_t>(at_(6 + d));
        k.batch_bwd[d] = reinterpret_cast<batch_bwd_t>(at_(9 + d));
        k.row_fwd[d] = reinterpret_cast<row_fwd_t>(at_(12 + d));
        k.row_bwd[d] = reinterpret_cast<row_bwd_t>(at_(15 + d));
        k.switch_fwd[d] = reinterpret_cast<switch_fwd_t>(at_(18 + d));
        k.switch_bwd[d] = reinterpret_cast<switch_bwd_t>(at_(21 + d));
        k.bin_fwd[d] = reinterpret_cast<bin_fwd_t>(at_(24 + d));
        k.bin_bwd[d] = reinterpret_cast<bin_bwd_t>(at_(27 + d));
        k.s0_fwd[d] = reinterpret_cast<s0_fwd_t>(at_(30 + d));
        k.s0_bwd[d] = reinterpret_cast<s0_bwd_t>(at_(33 + d));
        k.b0_fwd[d] = reinterpret_cast<b0_fwd_t>(at_(36 + d));
        k.b0_bwd[d] = reinterpret_cast<b0_bwd_t>(at_(39 + d));
        k.batch_fixed_fwd[d] = reinterpret_cast<batch_fixed_fwd_t>(at_(42 + d));
    }
    k.window_merge = reinterpret_cast<window_merge_t>(at_(3 * kFamilies));
    k.window_record = reinterpret_cast<window_record_t>(at_(3 * kFamilies + 1));
    k.wake = reinterpret_cast<wake_t>(at_(3 * kFamilies + 2));
    k.switch_keep_size = reinterpret_cast<keep_size_t>(at_(3 * kFamilies + 3));
    k.bin_keep_size = reinterpret_cast<keep_size_t>(at_(3 * kFamilies + 4));
    k.parallel_threshold = parallel_threshold;
    k.bound = true;
}

size_t dtype_index(const Tensor &x) {
    TORCH_CHECK(k.bound, "normzoo: the compiled operators were loaded but not bound to the kernels");
    switch (x.scalar_type()) {
        case at::kFloat: return 0;
        case at::kDouble: return 1;
        case at::kBFloat16: return 2;
        default: TORCH_CHECK(false, "normzoo: the native kernels take float32, float64 or bfloat16, got ", x.scalar_type());
    }
}

int threads_for(int64_t numel) {
    return numel < k.parallel_threshold ? 1 : std::max(1, at::get_num_threads());
}

// Wake the pool's sleeping workers before a parallel kernel (a no-op on PyTorch's OpenMP team).
void wake_for(int nthreads) {
    if (nthreads > 1 && k.wake != nullptr) k.wake();
}

int type_code(at::ScalarType t) {
    switch (t) {
        case at::kFloat: return 1;
        case at::kDouble: return 2;
        case at::kBFloat16: return 3;
        default: return 0;
    }
}

at::ScalarType arith_of(const Tensor &x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// A tensor's data for a kernel, NULL for an absent one (normzoo.native._ptr).
void *ptr_of(const Tensor &t) { return t.defined() ? t.data_ptr() : nullptr; }

// A parameter as the kernels read it: itself, or a contiguous copy in the arithmetic type (normzoo.native._typed_param).
struct Param {
    Tensor t;
    int code = 0;
    const void *ptr() const { return ptr_of(t); }
};

Param typed(const Tensor &t, int64_t size, at::ScalarType arith) {
    if (!t.defined()) return {};
    TORCH_CHECK(t.is_cpu(), "normzoo: expected CPU parameters for CPU input, got one on ", t.device());
    const int code = type_code(t.scalar_type());
    if (code != 0 && t.is_contiguous() && t.numel() == size) return {t, code};
    return {t.detach().reshape({size}).to(arith).contiguous(), type_code(arith)};
}

// The buffer a kernel writes a parameter's gradient into: in the dtype it read the parameter in (or the dtype of a
// parameter it did not read) where it writes that type, else the arithmetic type (normzoo.native._grad_out).
Tensor grad_buffer(std::optional<at::ScalarType> dtype, int64_t size, at::ScalarType arith, int *code) {
    const at::ScalarType want = dtype && type_code(*dtype) != 0 ? *dtype : arith;
    *code = type_code(want);
    return at::empty({size}, at::TensorOptions().dtype(want));
}

// A gradient as its parameter: its dtype and shape (normzoo._autograd.grad_as, normzoo.row_norm._as_param).
Tensor as_param(Tensor grad, at::ScalarType dtype, at::IntArrayRef shape) {
    if (grad.scalar_type() != dtype) grad = grad.to(dtype);
    return grad.sizes() == shape ? grad : grad.view(shape);
}

// normzoo.native.layout: 0 contiguous (N, C, *S), 1 channels_last (a contiguous (N, C), or (N, C, 1, ...), counts
// as 1), -1 neither.
int layout_of(const Tensor &t) {
    if (t.is_contiguous()) return t.dim() == 2 || (t.dim() > 2 && t.numel() == t.size(0) * t.size(1)) ? 1 : 0;
    if (t.dim() == 4) return t.is_contiguous(at::MemoryFormat::ChannelsLast) ? 1 : -1;
    if (t.dim() == 5) return t.is_contiguous(at::MemoryFormat::ChannelsLast3d) ? 1 : -1;
    if (t.dim() < 3) return -1;
    int64_t expected = 1;  // (N, *S, C) contiguous: C, then S from the last dim, then N
    std::vector<int64_t> order{1};
    for (int64_t d = t.dim() - 1; d > 1; d--) order.push_back(d);
    order.push_back(0);
    for (int64_t d : order) {
        if (t.size(d) != 1) {
            if (t.stride(d) != expected) return -1;
            expected *= t.size(d);
        }
    }
    return 1;
}

// dy in x's dtype and layout (normzoo.native._like).
Tensor like(const Tensor &x, Tensor dy, int lay) {
    if (dy.scalar_type() != x.scalar_type()) dy = dy.to(x.scalar_type());
    if (layout_of(dy) == lay) return dy;
    if (lay == 0 || x.dim() == 2) return dy.contiguous();
    if (x.dim() == 4) return dy.contiguous(at::MemoryFormat::ChannelsLast);
    if (x.dim() == 5) return dy.contiguous(at::MemoryFormat::ChannelsLast3d);
    return dy.movedim(1, -1).contiguous().movedim(-1, 1);
}

// torch.autograd.function.once_differentiable's rule: under create_graph, outputs whose derivative raises.
variable_list first_order_only(variable_list outputs, const variable_list &grads) {
    if (!at::GradMode::is_enabled()) return outputs;
    bool any = false;
    for (const auto &g : grads) any = any || (g.defined() && g.requires_grad());
    if (!any) return outputs;
    for (auto &o : outputs) {
        if (o.defined()) {
            o = o.detach();
            o.set_requires_grad(true);
        }
    }
    const auto n = static_cast<int64_t>(outputs.size());
    return torch::autograd::DelayedError(
               "trying to differentiate twice a function that was marked with @once_differentiable", n)(
        std::move(outputs));
}

std::optional<at::ScalarType> dtype_of(const Tensor &t) {
    return t.defined() ? std::optional<at::ScalarType>(t.scalar_type()) : std::nullopt;
}

// Autograd numbers only the tensor arguments given (an absent optional one has no edge): the edge of each.
struct Edges {
    size_t next = 1;  // x is edge 0
    bool wants(AutogradContext *ctx, bool present) { return present && ctx->needs_input_grad(next++); }
};

// What the backward of every op on (N, C, *S) input starts from: its saved tensors (x first), x's dtype index, shape
// and layout (saved as "lay"), the threads (the pool's workers woken), and dy in x's dtype and layout.
struct Backward {
    variable_list saved;
    Tensor x, dy;
    size_t d;
    int lay, nthreads;
    int64_t n, c, numel;

    Backward(AutogradContext *ctx, const Tensor &grad)
        : saved(ctx->get_saved_variables()), x(saved[0]), d(dtype_index(x)),
          lay(static_cast<int>(ctx->saved_data["lay"].toInt())), nthreads(threads_for(x.numel())), n(x.size(0)),
          c(x.size(1)), numel(x.numel()) {
        wake_for(nthreads);
        dy = like(x, grad, lay);
    }
    int64_t l() const { return numel / (n * c); }
};

// The bias is not saved for the backward (the kernels do not read it): its dtype and shape are.
void save_bias(AutogradContext *ctx, const Tensor &b) {
    ctx->saved_data["bias_dtype"] = b.defined() ? static_cast<int64_t>(b.scalar_type()) : int64_t(-1);
    if (b.defined()) ctx->saved_data["bias_shape"] = b.sizes().vec();
}

// What the backwards of the ops with a weight and a bias share: the weight as the kernels read it, which of the
// two gradients autograd asks for, the buffers the kernel writes them into, and those as their parameters.
struct AffineGrads {
    Param g;
    Tensor dg, db;
    int gcode = 0, bcode = 0;

    AffineGrads(AutogradContext *ctx, const Tensor &w, int64_t size, at::ScalarType arith)
        : g(typed(w, size, arith)), gcode(g.code), w_(w) {
        const int64_t bias_code = ctx->saved_data["bias_dtype"].toInt();
        if (bias_code >= 0) bias_dtype_ = static_cast<at::ScalarType>(bias_code);
        Edges edges;
        if (edges.wants(ctx, w.defined())) dg = grad_buffer(dtype_of(g.t), size, arith, &gcode);
        if (edges.wants(ctx, bias_dtype_.has_value())) db = grad_buffer(bias_dtype_, size, arith, &bcode);
        if (db.defined()) bias_shape_ = ctx->saved_data["bias_shape"].toIntVector();
    }
    void *dg_ptr() const { return ptr_of(dg); }
    void *db_ptr() const { return ptr_of(db); }
    // The gradients of the weight and the bias as their parameters (undefined where not asked for).
    std::pair<Tensor, Tensor> as_params() const {
        return {dg.defined() ? as_param(dg, w_.scalar_type(), w_.sizes()) : Tensor(),
                db.defined() ? as_param(db, *bias_dtype_, bias_shape_) : Tensor()};
    }

  private:
    Tensor w_;
    std::optional<at::ScalarType> bias_dtype_;
    std::vector<int64_t> bias_shape_;
};

// ---- statistics local to a sample: InstanceNorm, GroupNorm, channel-first LayerNorm (channel_norm._GroupFn) ----
// y and the float64 (3, N, G) statistics block: mean, M2, rstd per (sample, group).
struct GroupOp : public torch::autograd::Function<GroupOp> {
    static variable_list forward(AutogradContext *ctx, const Tensor &x, const OptionalTensor &weight,
                                 const OptionalTensor &bias, int64_t groups, double eps, int64_t mode, int64_t lay) {
        const size_t d = dtype_index(x);
        const int64_t n = x.size(0), c = x.size(1), numel = x.numel();
        const Tensor w = weight.value_or(Tensor()), b = bias.value_or(Tensor());
        const Param g = typed(w, c, arith_of(x)), bt = typed(b, c, arith_of(x));
        Tensor y = at::empty_like(x);
        Tensor stats = at::empty({3, n, groups}, x.options().dtype(at::kDouble));
        double *p = stats.data_ptr<double>();
        k.group_fwd[d](x.data_ptr(), y.data_ptr(), n, c, numel / (n * c), groups, static_cast<int>(lay), g.ptr(),
                       g.code, bt.ptr(), bt.code, nullptr, 0, eps, static_cast<int>(mode), p, p + n * groups,
                       p + 2 * n * groups, threads_for(numel));
        ctx->mark_non_differentiable({stats});
        ctx->set_materialize_grads(false);
        ctx->save_for_backward({x, w, stats});
        ctx->saved_data["groups"] = groups;
        ctx->saved_data["mode"] = mode;
        ctx->saved_data["lay"] = lay;
        save_bias(ctx, b);
        return {y, stats};
    }

    static variable_list backward(AutogradContext *ctx, variable_list grads) {
        if (!grads[0].defined()) return variable_list(7);  // y was not used
        const Backward s(ctx, grads[0]);
        const Tensor &w = s.saved[1], &stats = s.saved[2];
        const int64_t groups = ctx->saved_data["groups"].toInt();
        Tensor dx = at::empty_like(s.x);
        const AffineGrads pg(ctx, w, s.c, arith_of(s.x));
        const double *p = stats.data_ptr<double>();
        k.group_bwd[s.d](s.dy.data_ptr(), s.x.data_ptr(), dx.data_ptr(), s.n, s.c, s.l(), groups, s.lay, pg.g.ptr(),
                         pg.gcode, nullptr, pg.bcode, nullptr, 0, static_cast<int>(ctx->saved_data["mode"].toInt()),
                         p, p + 2 * s.n * groups, pg.dg_ptr(), pg.db_ptr(), nullptr, nullptr, s.nthreads);
        const auto [dg, db] = pg.as_params();
        return first_order_only({dx, dg, db, Tensor(), Tensor(), Tensor(), Tensor()}, {grads[0]});
    }
};

// Statistics local to a sample (y): the layers' hot path.
Tensor group_norm(const Tensor &x, const OptionalTensor &weight, const OptionalTensor &bias, int64_t groups,
                  double eps, int64_t mode, int64_t lay) {
    return GroupOp::apply(x, weight, bias, groups, eps, mode, lay)[0];
}

// The same with its statistics block, for callers that use the moments (InstanceNorm's running statistics).
std::tuple<Tensor, Tensor> group_norm_stats(const Tensor &x, const OptionalTensor &weight, const OptionalTensor &bias,
                                            int64_t groups, double eps, int64_t mode, int64_t lay) {
    auto out = GroupOp::apply(x, weight, bias, groups, eps, mode, lay);
    return {out[0], out[1]};
}

// ---- Filter Response Normalization with its TLU (nn.response._FilterResponseFn's fused path): InstanceNorm's group
// kernels in their RMS mode with the threshold inside, z = max(gamma x / sqrt(nu2 + eps) + beta, tau); ``eps_t``:
// a learned eps (one value), whose gradient is -1/2 sum gamma rstd^3 sum_S dy x ----
struct FrnOp : public torch::autograd::Function<FrnOp> {
    static Tensor forward(AutogradContext *ctx, const Tensor &x, const OptionalTensor &weight,
                          const OptionalTensor &bias, const OptionalTensor &tau, const OptionalTensor &eps_t,
                          double eps, int64_t lay) {
        const size_t d = dtype_index(x);
        const int64_t n = x.size(0), c = x.size(1), numel = x.numel();
        const Tensor w = weight.value_or(Tensor()), b = bias.value_or(Tensor()), t = tau.value_or(Tensor());
        const at::ScalarType a = arith_of(x);
        const Param g = typed(w, c, a), bt = typed(b, c, a), tt = typed(t, c, a);
        Tensor y = at::empty_like(x);
        Tensor stats = at::empty({3, n, c}, x.options().dtype(at::kDouble));
        double *p = stats.data_ptr<double>();
        k.group_fwd[d](x.data_ptr(), y.data_ptr(), n, c, numel / (n * c), c, static_cast<int>(lay), g.ptr(), g.code,
                       bt.ptr(), bt.code, tt.ptr(), tt.code, eps, 2, p, p + n * c, p + 2 * n * c, threads_for(numel));
        ctx->save_for_backward({x, w, b, t, stats});
        ctx->saved_data["lay"] = lay;
        if (eps_t.has_value() && eps_t->defined()) {
            ctx->saved_data["eps_dtype"] = static_cast<int64_t>(eps_t->scalar_type());
            ctx->saved_data["eps_shape"] = eps_t->sizes().vec();
        }
        return y;
    }

    static variable_list backward(AutogradContext *ctx, variable_list grads) {
        const Backward s(ctx, grads[0]);
        const Tensor &x = s.x, &w = s.saved[1], &b = s.saved[2], &t = s.saved[3], &stats = s.saved[4];
        const bool learned = ctx->saved_data.count("eps_dtype") > 0;
        const int64_t n = s.n, c = s.c;
        Tensor dx = at::empty_like(x);
        const at::ScalarType a = arith_of(x);
        const Param g = typed(w, c, a), bt = typed(b, c, a), tt = typed(t, c, a);  // the TLU's mask reads b and t
        Edges edges;
        int gcode = g.code, bcode = bt.code, tcode = tt.code;
        const Tensor dg = edges.wants(ctx, w.defined()) ? grad_buffer(dtype_of(g.t), c, a, &gcode) : Tensor();
        const Tensor db = edges.wants(ctx, b.defined()) ? grad_buffer(dtype_of(bt.t), c, a, &bcode) : Tensor();
        const Tensor dt = edges.wants(ctx, t.defined()) ? grad_buffer(dtype_of(tt.t), c, a, &tcode) : Tensor();
        const Tensor dr = edges.wants(ctx, learned) ? at::empty({n, c}, x.options().dtype(at::kDouble)) : Tensor();
        const double *p = stats.data_ptr<double>();
        k.group_bwd[s.d](s.dy.data_ptr(), x.data_ptr(), dx.data_ptr(), n, c, s.l(), c, s.lay, g.ptr(), gcode, bt.ptr(),
                         bcode, tt.ptr(), tcode, 2, p, p + 2 * n * c, ptr_of(dg), ptr_of(db), ptr_of(dt),
                         static_cast<double *>(ptr_of(dr)), s.nthreads);
        Tensor deps;
        if (dr.defined()) {
            deps = (-0.5 * dr * stats[2].pow(3)).sum().reshape(ctx->saved_data["eps_shape"].toIntVector());
            deps = deps.to(static_cast<at::ScalarType>(ctx->saved_data["eps_dtype"].toInt()));
        }
        return first_order_only({dx, dg.defined() ? as_param(dg, w.scalar_type(), w.sizes()) : Tensor(),
                                 db.defined() ? as_param(db, b.scalar_type(), b.sizes()) : Tensor(),
                                 dt.defined() ? as_param(dt, t.scalar_type(), t.sizes()) : Tensor(), deps, Tensor(),
                                 Tensor()},
                                grads);
    }
};

Tensor filter_response_norm(const Tensor &x, const OptionalTensor &weight, const OptionalTensor &bias,
                            const OptionalTensor &tau, const OptionalTensor &eps_t, double eps, int64_t lay) {
    return FrnOp::apply(x, weight, bias, tau, eps_t, eps, lay);
}

// ---- BatchNorm training on the batch's statistics (channel_norm._BatchFn; Batch Renorm's and Cross-Iteration
// BN's variants too) ----
bool running_in_kernel(const Tensor &mean, const Tensor &var) {  // normzoo.native.running_update_applies
    const Tensor &first = mean.defined() ? mean : var;
    if (!first.defined() || type_code(first.scalar_type()) == 0) return false;
    for (const Tensor *t : {&mean, &var}) {
        if (t->defined() && !(t->is_cpu() && t->dim() == 1 && t->is_contiguous() &&
                              t->scalar_type() == first.scalar_type()))
            return false;
    }
    return true;
}

// The extra inputs of BatchNorm's variants: Batch Renorm's limits (r, d formed in the kernel from the running
// statistics), Cross-Iteration BN's window (constant moments merged into every channel's).
struct BatchExtras {
    bool renorm = false;
    double r_max = 0.0, d_max = 0.0;
    double extra_count = 0.0;
    Tensor extra;  // float64 (2, C): the window's mean and M2; undefined for none
};

// y and the float64 statistics block, rows mean, M2, rstd (merged ones with a window), then r, d (renorm), then
// the batch's own mean, M2 (window): normzoo.native._batch_forward's block.
struct BatchOp : public torch::autograd::Function<BatchOp> {
    static variable_list forward(AutogradContext *ctx, const Tensor &x, const OptionalTensor &weight,
                                 const OptionalTensor &bias, const OptionalTensor &running_mean,
                                 const OptionalTensor &running_var, double momentum, double eps, int64_t mode,
                                 int64_t lay, BatchExtras extras) {
        const size_t d = dtype_index(x);
        const int64_t n = x.size(0), c = x.size(1), numel = x.numel(), l = numel / (n * c);
        const Tensor w = weight.value_or(Tensor()), b = bias.value_or(Tensor());
        const Tensor rm = running_mean.value_or(Tensor()), rv = running_var.value_or(Tensor());
        const Param g = typed(w, c, arith_of(x)), bt = typed(b, c, arith_of(x));
        const bool in_kernel = running_in_kernel(rm, rv), window = extras.extra.defined();
        TORCH_CHECK(!extras.renorm || in_kernel, "normzoo::batch_norm: Batch Renorm needs running statistics the "
                    "kernel takes (contiguous (C,) float32, float64 or bfloat16 of one dtype)");
        Tensor y = at::empty_like(x);
        const int64_t rows = 3 + 2 * extras.renorm + 2 * window;
        Tensor stats = at::empty({rows, c}, x.options().dtype(at::kDouble));
        double *p = stats.data_ptr<double>();
        const double own = static_cast<double>(n * l);
        k.batch_fwd[d](x.data_ptr(), y.data_ptr(), n, c, l, static_cast<int>(lay), g.ptr(), g.code, bt.ptr(), bt.code,
                       eps, static_cast<int>(mode), p, p + c, p + 2 * c,
                       in_kernel ? ptr_of(rm) : nullptr, in_kernel ? ptr_of(rv) : nullptr,
                       in_kernel ? type_code((rm.defined() ? rm : rv).scalar_type()) : 0, momentum,
                       extras.renorm ? p + 3 * c : nullptr, extras.r_max, extras.d_max, own + extras.extra_count,
                       window ? extras.extra.data_ptr<double>() : nullptr, window ? p + (rows - 2) * c : nullptr,
                       threads_for(numel));
        if (!in_kernel && (rm.defined() || rv.defined())) {  // normzoo.running.update_running_stats, own moments
            at::NoGradGuard no_grad;
            const Tensor mean = stats[window ? rows - 2 : 0], m2 = stats[window ? rows - 1 : 1];
            const Tensor var = own > 1 ? m2 / (own - 1) : at::zeros_like(m2);
            if (rm.defined()) rm.lerp_(mean.to(rm.scalar_type()), momentum);
            if (rv.defined()) rv.lerp_(var.to(rv.scalar_type()), momentum);
        }
        ctx->mark_non_differentiable({stats});
        ctx->set_materialize_grads(false);
        ctx->save_for_backward({x, w, stats});
        ctx->saved_data["mode"] = mode;
        ctx->saved_data["lay"] = lay;
        save_bias(ctx, b);
        ctx->saved_data["renorm"] = extras.renorm;
        ctx->saved_data["count"] = window ? own + extras.extra_count : 0.0;
        return {y, stats};
    }

    static variable_list backward(AutogradContext *ctx, variable_list grads) {
        const variable_list none(12);
        if (!grads[0].defined()) return none;  // y was not used
        const Backward s(ctx, grads[0]);
        const Tensor &w = s.saved[1], &stats = s.saved[2];
        const bool renorm = ctx->saved_data["renorm"].toBool();
        const int64_t c = s.c;
        Tensor dx = at::empty_like(s.x);
        const AffineGrads pg(ctx, w, c, arith_of(s.x));
        const double *p = stats.data_ptr<double>();
        k.batch_bwd[s.d](s.dy.data_ptr(), s.x.data_ptr(), dx.data_ptr(), s.n, c, s.l(), s.lay, pg.g.ptr(), pg.gcode,
                         p, p + 2 * c, static_cast<int>(ctx->saved_data["mode"].toInt()),
                         ctx->saved_data["count"].toDouble(), renorm ? p + 3 * c : nullptr, pg.dg_ptr(), pg.db_ptr(),
                         pg.bcode, 0, s.nthreads);
        variable_list out = none;
        std::tie(out[1], out[2]) = pg.as_params();
        out[0] = dx;
        return first_order_only(std::move(out), {grads[0]});
    }
};

// ---- BatchNorm with fixed statistics (eval mode: the running ones; channel_norm.fixed_affine) ----
// y = gamma (x - mean) rstd + beta; the float64 (2, C) block of mean and rstd is saved for the backward, dx = gamma
// rstd dy. Unlike the training ops this one is linear in x with constant statistics, as torch's eval BatchNorm and
// the tensor formula it replaces: under create_graph its backward is taken with tensor operations, which autograd
// can differentiate again. x is kept only where a parameter requires grad (its sums read x): a frozen BatchNorm
// (tools.freeze with frozen parameters) keeps no activation, as a multiply by a constant would not.
struct FixedBatchOp : public torch::autograd::Function<FixedBatchOp> {
    static Tensor forward(AutogradContext *ctx, const Tensor &x, const OptionalTensor &weight,
                          const OptionalTensor &bias, const Tensor &mean, const OptionalTensor &var, double eps,
                          int64_t mode, int64_t lay) {
        const size_t d = dtype_index(x);
        const int64_t n = x.size(0), c = x.size(1), numel = x.numel(), l = numel / (n * c);
        const Tensor w = weight.value_or(Tensor()), b = bias.value_or(Tensor()), v = var.value_or(Tensor());
        TORCH_CHECK(mode == 1 || v.defined(), "normzoo::batch_norm_fixed: needs var unless mode is 1 (mean-only)");
        const Param g = typed(w, c, arith_of(x)), bt = typed(b, c, arith_of(x));
        const Param m = typed(mean, c, at::kDouble), vv = typed(v, c, at::kDouble);
        Tensor y = at::empty_like(x);
        Tensor stats = at::empty({2, c}, x.options().dtype(at::kDouble));
        k.batch_fixed_fwd[d](x.data_ptr(), y.data_ptr(), n, c, l, static_cast<int>(lay), g.ptr(), g.code, bt.ptr(),
                             bt.code, m.ptr(), m.code, vv.ptr(), vv.code, eps, static_cast<int>(mode),
                             stats.data_ptr<double>(), threads_for(numel));
        const bool keep_x = (w.defined() && w.requires_grad()) || (b.defined() && b.requires_grad());
        ctx->set_materialize_grads(false);
        ctx->save_for_backward({keep_x ? x : Tensor(), w, stats});
        ctx->saved_data["mode"] = mode;
        ctx->saved_data["lay"] = lay;
        ctx->saved_data["keep_x"] = keep_x;
        save_bias(ctx, b);
        return y;
    }

    static variable_list backward(AutogradContext *ctx, variable_list grads) {
        const variable_list none(8);
        if (!grads[0].defined()) return none;
        if (at::GradMode::is_enabled()) return twice_differentiable(ctx, grads[0]);
        if (!ctx->saved_data["keep_x"].toBool()) return frozen(ctx, grads[0]);
        const Backward s(ctx, grads[0]);
        const Tensor &w = s.saved[1], &stats = s.saved[2];
        const int64_t c = s.c;
        Tensor dx = at::empty_like(s.x);
        const AffineGrads pg(ctx, w, c, arith_of(s.x));
        const double *p = stats.data_ptr<double>();
        k.batch_bwd[s.d](s.dy.data_ptr(), s.x.data_ptr(), dx.data_ptr(), s.n, c, s.l(), s.lay, pg.g.ptr(), pg.gcode,
                         p, p + c, static_cast<int>(ctx->saved_data["mode"].toInt()), 0.0, nullptr, pg.dg_ptr(),
                         pg.db_ptr(), pg.bcode, 1, s.nthreads);
        variable_list out = none;
        std::tie(out[1], out[2]) = pg.as_params();
        out[0] = dx;
        return out;
    }

    // No parameter needs a gradient (x was not kept): dx = gamma rstd dy, from dy alone (whose dtype and shape are y's,
    // so x's).
    static variable_list frozen(AutogradContext *ctx, const Tensor &grad) {
        const auto saved = ctx->get_saved_variables();
        const Tensor &w = saved[1], &stats = saved[2];
        const int lay = static_cast<int>(ctx->saved_data["lay"].toInt());
        const Tensor dy = like(grad, grad, lay);
        const int64_t n = dy.size(0), c = dy.size(1), numel = dy.numel();
        const int nthreads = threads_for(numel);
        wake_for(nthreads);
        Tensor dx = at::empty_like(dy);
        const Param g = typed(w, c, arith_of(dy));
        const double *p = stats.data_ptr<double>();
        k.batch_bwd[dtype_index(dy)](dy.data_ptr(), nullptr, dx.data_ptr(), n, c, numel / (n * c), lay, g.ptr(), g.code,
                                     p, p + c, static_cast<int>(ctx->saved_data["mode"].toInt()), 0.0, nullptr,
                                     nullptr, nullptr, 0, 1, nthreads);
        variable_list out(8);
        out[0] = dx;
        return out;
    }

    // The same gradients from tensor operations (in the arithmetic type of x, whose dtype and shape are the
    // gradient's), recorded for a further derivative.
    static variable_list twice_differentiable(AutogradContext *ctx, const Tensor &grad) {
        const auto saved = ctx->get_saved_variables();
        const Tensor &x = saved[0], &w = saved[1], &stats = saved[2];
        const at::ScalarType a = arith_of(grad);
        std::vector<int64_t> shape(grad.dim(), 1), dims{0};
        shape[1] = grad.size(1);
        for (int64_t i = 2; i < grad.dim(); i++) dims.push_back(i);
        const Tensor rstd = stats[1].to(a).view(shape), dy = grad.to(a);
        variable_list out(8);
        out[0] = (w.defined() ? dy * (w.to(a).view(shape) * rstd) : dy * rstd).to(grad.scalar_type());
        Edges edges;
        if (edges.wants(ctx, w.defined()))
            out[1] = (dy * (x.to(a) - stats[0].to(a).view(shape)) * rstd).sum(dims).to(w.scalar_type()).view(w.sizes());
        const int64_t bias_code = ctx->saved_data["bias_dtype"].toInt();
        if (edges.wants(ctx, bias_code >= 0))
            out[2] = dy.sum(dims).to(static_cast<at::ScalarType>(bias_code))
                         .view(ctx->saved_data["bias_shape"].toIntVector());
        return out;
    }
};

Tensor batch_norm_fixed(const Tensor &x, const OptionalTensor &weight, const OptionalTensor &bias, const Tensor &mean,
                        const OptionalTensor &var, double eps, int64_t mode, int64_t lay) {
    return FixedBatchOp::apply(x, weight, bias, mean, var, eps, mode, lay);
}

// normzoo.native.batch_merged_forward's window block: the two rows of one float64 (2, C) block, read in place.
Tensor window_block(const Tensor &mean, const Tensor &m2, int64_t c) {
    if (mean.scalar_type() == at::kDouble && m2.scalar_type() == at::kDouble && mean.numel() == c &&
        m2.numel() == c && mean.is_contiguous() && m2.is_contiguous() && mean.is_cpu() && m2.is_cpu() &&
        static_cast<const char *>(m2.data_ptr()) == static_cast<const char *>(mean.data_ptr()) + 8 * c)
        return mean;
    return at::cat({mean.reshape({-1}), m2.reshape({-1})}).to(at::kDouble).contiguous();
}

// BatchNorm training (y): the layers' hot path.
Tensor batch_norm(const Tensor &x, const OptionalTensor &weight, const OptionalTensor &bias,
                  const OptionalTensor &running_mean, const OptionalTensor &running_var, double momentum, double eps,
                  int64_t mode, int64_t lay) {
    return BatchOp::apply(x, weight, bias, running_mean, running_var, momentum, eps, mode, lay, BatchExtras{})[0];
}

// BatchNorm training with its statistics block, and Batch Renorm's limits or a window's moments.
std::tuple<Tensor, Tensor> batch_norm_stats(const Tensor &x, const OptionalTensor &weight, const OptionalTensor &bias,
                                            const OptionalTensor &running_mean, const OptionalTensor &running_var,
                                            double momentum, double eps, int64_t mode, int64_t lay, bool renorm,
                                            double r_max, double d_max, double extra_count,
                                            const OptionalTensor &extra_mean, const OptionalTensor &extra_m2) {
    BatchExtras extras;
    extras.renorm = renorm, extras.r_max = r_max, extras.d_max = d_max;
    if (extra_mean.has_value() && extra_m2.has_value()) {
        extras.extra_count = extra_count;
        extras.extra = window_block(*extra_mean, *extra_m2, x.size(1));
    }
    auto out = BatchOp::apply(x, weight, bias, running_mean, running_var, momentum, eps, mode, lay, extras);
    return {out[0], out[1]};
}

// ---- Cross-Iteration BatchNorm's step (nn.cross_iteration): the window's slots merged, BatchNorm with them, the
// step's own moments stored in a slot, in one call (normzoo.native_window's kernels, or tensor operations for
// buffers they do not take) ----
int window_code(const Tensor &count, const Tensor &mean, const Tensor &var) {  // native_window._code
    const int code = type_code(mean.scalar_type());
    for (const Tensor *t : {&count, &mean, &var}) {
        if (code == 0 || t->scalar_type() != mean.scalar_type() || !t->is_cpu() || !t->is_contiguous()) return 0;
    }
    return code;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> cross_iteration_norm(
    const Tensor &x, const OptionalTensor &weight, const OptionalTensor &bias, const OptionalTensor &running_mean,
    const OptionalTensor &running_var, double momentum, double eps, int64_t lay, bool merge, const Tensor &count_p,
    const Tensor &mean_p, const Tensor &var_p, int64_t slot, const Tensor &count_buf, const Tensor &mean_buf,
    const Tensor &var_buf, bool keep_old) {
    const int64_t c = x.size(1), n = x.numel() / c;
    BatchExtras extras;
    if (merge) {  // the slots (count (K,), mean and biased var (K, C)) merged per channel: count, mean, M2
        const auto f64 = at::TensorOptions().dtype(at::kDouble);
        Tensor block = at::empty({2, c}, f64);
        const int code = window_code(count_p, mean_p, var_p);
        if (code != 0) {
            double *p = block.data_ptr<double>();
            extras.extra_count = k.window_merge(mean_p.size(0), c, code, count_p.data_ptr(), mean_p.data_ptr(),
                                                var_p.data_ptr(), p, p + c);
        } else {  // (CrossIterationBatchNorm._merge_slowly)
            at::NoGradGuard no_grad;
            const Tensor counts = count_p.to(at::kDouble).unsqueeze(1), mean = mean_p.to(at::kDouble);
            const Tensor total = counts.sum();
            extras.extra_count = total.item<double>();
            const Tensor mu = (counts * mean).sum(0) / total.clamp_min(1e-300);
            block[0].copy_(mu);
            block[1].copy_((counts * (var_p.to(at::kDouble) + (mean - mu).square())).sum(0));
        }
        extras.extra = block;
    }
    auto out = BatchOp::apply(x, weight, bias, running_mean, running_var, momentum, eps, 0, lay, extras);
    const Tensor &stats = out[1];
    const int64_t rows = stats.size(0);
    Tensor old = at::empty({keep_old ? 1 + 2 * c : 0}, at::TensorOptions().dtype(at::kDouble));
    if (slot >= 0) {  // this step's own moments into the slot: count n, mean, var = M2 / n
        const Tensor own_mean = stats[merge ? rows - 2 : 0], own_m2 = stats[merge ? rows - 1 : 1];
        const int code = window_code(count_buf, mean_buf, var_buf);
        if (code != 0) {
            k.window_record(slot, c, code, count_buf.data_ptr(), mean_buf.data_ptr(), var_buf.data_ptr(),
                            static_cast<double>(n), own_mean.data_ptr<double>(), own_m2.data_ptr<double>(),
                            keep_old ? old.data_ptr<double>() : nullptr);
        } else {  // (CrossIterationBatchNorm._record_slowly)
            at::NoGradGuard no_grad;
            if (keep_old)
                old.copy_(at::cat({count_buf.narrow(0, slot, 1).to(at::kDouble), mean_buf[slot].to(at::kDouble),
                                   var_buf[slot].to(at::kDouble)}));
            count_buf[slot].fill_(static_cast<double>(n));
            mean_buf[slot].copy_(own_mean);
            var_buf[slot].copy_(own_m2 / static_cast<double>(n));
        }
    }
    Tensor merged_count = at::scalar_tensor(static_cast<double>(n) + extras.extra_count,
                                            at::TensorOptions().dtype(at::kDouble));
    return {out[0], stats, old, merged_count};
}

// ---- Switchable Normalization (nn.switchable._SwitchNormNativeFn) and Batch-Instance Normalization
// (nn.batch_instance._BatchInstanceNormNativeFn): moments, O(N C) algebra and affine map in one call each way ----
int running_code(const Tensor &rm, const Tensor &rv) {  // normzoo.native._running_type
    if (!rm.defined() && !rv.defined()) return 0;
    TORCH_CHECK(running_in_kernel(rm, rv), "normzoo: running statistics must be contiguous (C,) float32, float64 or "
                "bfloat16 CPU tensors of one dtype");
    return type_code((rm.defined() ? rm : rv).scalar_type());
}

int64_t dtype_code(const Tensor &t) { return t.defined() ? static_cast<int64_t>(t.scalar_type()) : int64_t(-1); }

// The buffer for a mixture kernel's parameter gradient (native_mixtures._grad_buffer): the parameter's dtype where the
// kernels write it, else float64; undefined where the parameter is absent or its gradient not wanted.
Tensor mixture_grad(int64_t dtype, int64_t size, bool wanted, int *code) {
    *code = 0;
    if (dtype < 0 || !wanted) return Tensor();
    return grad_buffer(static_cast<at::ScalarType>(dtype), size, at::kDouble, code);
}

Tensor grad_in(const Tensor &grad, int64_t dtype) {  // normzoo._autograd.grad_as
    return grad.defined() && grad.scalar_type() != static_cast<at::ScalarType>(dtype)
               ? grad.to(static_cast<at::ScalarType>(dtype)) : grad;
}

// What the mixture norms' ops keep for the backward, and what their backwards share: dy in x's layout, dx where
// asked for, the weight as the kernels read it, and a buffer for each parameter gradient asked for (``sizes``:
// each parameter's, -1 for C), in the parameter's dtype where the kernels write it.
void save_mixture(AutogradContext *ctx, const Tensor &x, const Tensor &w, const Tensor &keep, bool use_batch,
                  int64_t lay, std::vector<int64_t> dtypes) {
    ctx->save_for_backward({x, w, keep});
    ctx->saved_data["use_batch"] = use_batch;
    ctx->saved_data["lay"] = lay;
    ctx->saved_data["dtypes"] = std::move(dtypes);
}

struct MixtureGrads : Backward {
    Tensor keep, dx;
    int use_batch;
    Param g;
    std::vector<int64_t> dtypes;
    std::vector<Tensor> outs;
    std::vector<int> codes;

    MixtureGrads(AutogradContext *ctx, const variable_list &grads, std::initializer_list<int64_t> sizes)
        : Backward(ctx, grads[0]), keep(saved[2]), use_batch(ctx->saved_data["use_batch"].toBool() ? 1 : 0),
          g(typed(saved[1], c, at::kDouble)), dtypes(ctx->saved_data["dtypes"].toIntVector()) {
        if (ctx->needs_input_grad(0)) dx = at::empty_like(x);
        Edges edges;  // weight and bias may be absent; the mixing parameters are always there
        size_t i = 0;
        for (int64_t size : sizes) {
            int code = 0;
            outs.push_back(mixture_grad(dtypes[i], size < 0 ? c : size, edges.wants(ctx, dtypes[i] >= 0), &code));
            codes.push_back(code);
            i++;
        }
    }
    void *out(size_t i) const { return ptr_of(outs[i]); }
    // dx, then each parameter's gradient in its dtype, then nothing for the other arguments (``count`` in all).
    variable_list result(size_t count) const {
        variable_list r(count);
        r[0] = dx;
        for (size_t i = 0; i < outs.size(); i++) r[1 + i] = grad_in(outs[i], dtypes[i]);
        return r;
    }
};

struct SwitchOp : public torch::autograd::Function<SwitchOp> {
    static Tensor forward(AutogradContext *ctx, const Tensor &x, const OptionalTensor &weight,
                          const OptionalTensor &bias, const Tensor &mean_logits, const Tensor &var_logits,
                          const OptionalTensor &running_mean, const OptionalTensor &running_var, bool use_batch,
                          bool training, double momentum, double eps, int64_t lay) {
        const size_t d = dtype_index(x);
        const int64_t n = x.size(0), c = x.size(1), numel = x.numel(), l = numel / (n * c);
        const bool read = !use_batch || training;  // running statistics: read in eval, updated in training
        const Tensor rm = read ? running_mean.value_or(Tensor()) : Tensor();
        const Tensor rv = read ? running_var.value_or(Tensor()) : Tensor();
        const Tensor w = weight.value_or(Tensor()), b = bias.value_or(Tensor());
        const Param ml = typed(mean_logits.detach(), 3, at::kDouble), vl = typed(var_logits.detach(), 3, at::kDouble);
        const Param g = typed(w, c, at::kDouble), bt = typed(b, c, at::kDouble);
        const int run_type = running_code(rm, rv);
        Tensor y = at::empty_like(x);
        Tensor keep = at::empty({k.switch_keep_size(n, c)}, x.options().dtype(at::kDouble));
        k.switch_fwd[d](x.data_ptr(), y.data_ptr(), n, c, l, static_cast<int>(lay), ml.ptr(), ml.code, vl.ptr(),
                        vl.code, ptr_of(rm), ptr_of(rv), run_type, use_batch ? 1 : 0, momentum, g.ptr(), g.code,
                        bt.ptr(), bt.code, eps, keep.data_ptr<double>(), threads_for(numel));
        save_mixture(ctx, x, w, keep, use_batch, lay,
                     {dtype_code(w), dtype_code(b), dtype_code(mean_logits), dtype_code(var_logits)});
        return y;
    }

    static variable_list backward(AutogradContext *ctx, variable_list grads) {
        const MixtureGrads m(ctx, grads, {-1, -1, 3, 3});
        k.switch_bwd[m.d](m.dy.data_ptr(), m.x.data_ptr(), ptr_of(m.dx), m.n, m.c, m.l(), m.lay,
                          m.use_batch, m.g.ptr(), m.g.code, m.keep.data_ptr<double>(), m.out(0), m.codes[0], m.out(1),
                          m.codes[1], m.out(2), m.codes[2], m.out(3), m.codes[3], m.nthreads);
        return first_order_only(m.result(12), grads);
    }
};

Tensor switchable_norm(const Tensor &x, const OptionalTensor &weight, const OptionalTensor &bias,
                       const Tensor &mean_logits, const Tensor &var_logits, const OptionalTensor &running_mean,
                       const OptionalTensor &running_var, bool use_batch, bool training, double momentum, double eps,
                       int64_t lay) {
    return SwitchOp::apply(x, weight, bias, mean_logits, var_logits, running_mean, running_var, use_batch, training,
                           momentum, eps, lay);
}

struct BinOp : public torch::autograd::Function<BinOp> {
    static Tensor forward(AutogradContext *ctx, const Tensor &x, const OptionalTensor &weight,
                          const OptionalTensor &bias, const Tensor &rho, const OptionalTensor &running_mean,
                          const OptionalTensor &running_var, bool use_batch, bool training, double momentum, double eps,
                          int64_t lay) {
        const size_t d = dtype_index(x);
        const int64_t n = x.size(0), c = x.size(1), numel = x.numel(), l = numel / (n * c);
        const bool read = !use_batch || training;
        const Tensor rm = read ? running_mean.value_or(Tensor()) : Tensor();
        const Tensor rv = read ? running_var.value_or(Tensor()) : Tensor();
        const Tensor w = weight.value_or(Tensor()), b = bias.value_or(Tensor());
        const Param r = typed(rho.detach(), c, at::kDouble), g = typed(w, c, at::kDouble), bt = typed(b, c, at::kDouble);
        const int run_type = running_code(rm, rv);
        Tensor y = at::empty_like(x);
        Tensor keep = at::empty({k.bin_keep_size(n, c)}, x.options().dtype(at::kDouble));
        k.bin_fwd[d](x.data_ptr(), y.data_ptr(), n, c, l, static_cast<int>(lay), r.ptr(), r.code, ptr_of(rm),
                     ptr_of(rv), run_type, use_batch ? 1 : 0, momentum, g.ptr(), g.code, bt.ptr(), bt.code, eps,
                     keep.data_ptr<double>(), threads_for(numel));
        save_mixture(ctx, x, w, keep, use_batch, lay, {dtype_code(w), dtype_code(b), dtype_code(rho)});
        return y;
    }

    static variable_list backward(AutogradContext *ctx, variable_list grads) {
        const MixtureGrads m(ctx, grads, {-1, -1, -1});
        k.bin_bwd[m.d](m.dy.data_ptr(), m.x.data_ptr(), ptr_of(m.dx), m.n, m.c, m.l(), m.lay, m.use_batch,
                       m.g.ptr(), m.g.code, m.keep.data_ptr<double>(), m.out(0), m.codes[0], m.out(1), m.codes[1],
                       m.out(2), m.codes[2], m.nthreads);
        return first_order_only(m.result(11), grads);
    }
};

Tensor batch_instance_norm(const Tensor &x, const OptionalTensor &weight, const OptionalTensor &bias, const Tensor &rho,
                           const OptionalTensor &running_mean, const OptionalTensor &running_var, bool use_batch,
                           bool training, double momentum, double eps, int64_t lay) {
    return BinOp::apply(x, weight, bias, rho, running_mean, running_var, use_batch, training, momentum, eps, lay);
}

// ---- LayerNorm and RMSNorm over rows of d values (row_norm._RowNormFn) ----
struct RowOp : public torch::autograd::Function<RowOp> {
    static Tensor forward(AutogradContext *ctx, const Tensor &x, const OptionalTensor &weight,
                          const OptionalTensor &bias, int64_t d, double eps, bool rms) {
        const size_t t = dtype_index(x);
        const int64_t numel = x.numel(), r = numel / d;
        const Tensor w = weight.value_or(Tensor()), b = bias.value_or(Tensor());
        const Param g = typed(w, d, arith_of(x)), bt = typed(b, d, arith_of(x));
        Tensor y = at::empty_like(x);
        Tensor stats = at::empty({2, r}, x.options().dtype(at::kDouble));
        double *p = stats.data_ptr<double>();
        k.row_fwd[t](x.data_ptr(), y.data_ptr(), r, d, g.ptr(), g.code, bt.ptr(), bt.code, eps, rms ? 1 : 0, p, p + r,
                     threads_for(numel));
        ctx->save_for_backward({x, w, stats});
        ctx->saved_data["d"] = d;
        ctx->saved_data["rms"] = rms;
        save_bias(ctx, b);
        return y;
    }

    static variable_list backward(AutogradContext *ctx, variable_list grads) {
        const auto saved = ctx->get_saved_variables();
        const Tensor &x = saved[0], &w = saved[1], &stats = saved[2];
        const size_t t = dtype_index(x);
        const int64_t d = ctx->saved_data["d"].toInt(), numel = x.numel(), r = numel / d;
        const int nthreads = threads_for(numel);
        wake_for(nthreads);
        Tensor dy = grads[0];
        if (dy.scalar_type() != x.scalar_type() || !dy.is_contiguous()) dy = dy.to(x.scalar_type()).contiguous();
        Tensor dx = at::empty_like(x);
        const AffineGrads pg(ctx, w, d, arith_of(x));
        const double *p = stats.data_ptr<double>();
        k.row_bwd[t](dy.data_ptr(), x.data_ptr(), dx.data_ptr(), r, d, pg.g.ptr(), pg.gcode,
                     ctx->saved_data["rms"].toBool() ? 1 : 0, p, p + r, pg.dg_ptr(), pg.db_ptr(), pg.bcode, nthreads);
        const auto [dg, db] = pg.as_params();
        return first_order_only({ctx->needs_input_grad(0) ? dx : Tensor(), dg, db, Tensor(), Tensor(), Tensor()},
                                grads);
    }
};

Tensor row_norm(const Tensor &x, const OptionalTensor &weight, const OptionalTensor &bias, int64_t d, double eps,
                bool rms) {
    return RowOp::apply(x, weight, bias, d, eps, rms);
}

// ---- EvoNorm-S0 and EvoNorm-B0 (nn.evonorm._S0Native, _B0Native) on their own kernels, which read gamma, beta
// and v in one type (native_evonorm._typed): their own where they share one, else the arithmetic type ----
struct EvoParams {
    std::vector<Param> p;
    at::ScalarType dtype;  // the type the kernels read them in, and write their gradients in
    int code() const { return type_code(dtype); }
};

EvoParams evo_typed(int64_t c, at::ScalarType arith, std::initializer_list<const Tensor *> params) {
    EvoParams out;
    std::optional<at::ScalarType> common;
    bool mixed = false;
    for (const Tensor *t : params) {
        out.p.push_back(typed(*t, c, arith));
        const Tensor &u = out.p.back().t;
        if (u.defined()) {
            mixed = mixed || (common && *common != u.scalar_type());
            common = u.scalar_type();
        }
    }
    if (mixed) {
        for (Param &q : out.p) {
            if (q.t.defined()) q = {q.t.to(arith), type_code(arith)};
        }
    }
    out.dtype = mixed || !common ? arith : *common;
    return out;
}

// The buffers for dgamma, dbeta, dv (native_evonorm._grads: one (3, C) block of the parameters' read type), by the
// edges of the parameters given; and those gradients in their parameters' dtypes.
struct EvoGrads {
    Tensor block, dg, db, dv;
    EvoGrads(AutogradContext *ctx, int64_t c, at::ScalarType dtype, bool has_w, bool has_b, bool has_v) {
        block = at::empty({3, c}, at::TensorOptions().dtype(dtype));
        Edges edges;
        if (edges.wants(ctx, has_w)) dg = block[0];
        if (edges.wants(ctx, has_b)) db = block[1];
        if (edges.wants(ctx, has_v)) dv = block[2];
    }
};

struct S0Op : public torch::autograd::Function<S0Op> {
    static Tensor forward(AutogradContext *ctx, const Tensor &x, const OptionalTensor &weight,
                          const OptionalTensor &bias, const OptionalTensor &v, int64_t groups, double eps,
                          int64_t lay) {
        const size_t d = dtype_index(x);
        const int64_t n = x.size(0), c = x.size(1), numel = x.numel();
        const Tensor w = weight.value_or(Tensor()), b = bias.value_or(Tensor()), vv = v.value_or(Tensor());
        const EvoParams ps = evo_typed(c, arith_of(x), {&w, &b, &vv});
        Tensor y = at::empty_like(x);
        Tensor stats = at::empty({2, n, groups}, x.options().dtype(at::kDouble));  // group mean, rstd
        double *p = stats.data_ptr<double>();
        k.s0_fwd[d](x.data_ptr(), y.data_ptr(), n, c, numel / (n * c), groups, static_cast<int>(lay), ps.p[0].ptr(),
                    ps.p[1].ptr(), ps.p[2].ptr(), ps.code(), eps, p, p + n * groups, threads_for(numel));
        ctx->save_for_backward({x, w, vv, stats});
        ctx->saved_data["groups"] = groups;
        ctx->saved_data["lay"] = lay;
        ctx->saved_data["dtypes"] = std::vector<int64_t>{dtype_code(w), dtype_code(b), dtype_code(vv)};
        return y;
    }

    static variable_list backward(AutogradContext *ctx, variable_list grads) {
        const Backward s(ctx, grads[0]);
        const Tensor &w = s.saved[1], &vv = s.saved[2], &stats = s.saved[3];
        const int64_t groups = ctx->saved_data["groups"].toInt();
        const auto dtypes = ctx->saved_data["dtypes"].toIntVector();
        Tensor dx = at::empty_like(s.x);
        const EvoParams ps = evo_typed(s.c, arith_of(s.x), {&w, &vv});
        const EvoGrads g(ctx, s.c, ps.dtype, dtypes[0] >= 0, dtypes[1] >= 0, dtypes[2] >= 0);
        const double *p = stats.data_ptr<double>();
        k.s0_bwd[s.d](s.dy.data_ptr(), s.x.data_ptr(), dx.data_ptr(), s.n, s.c, s.l(), groups, s.lay, ps.p[0].ptr(),
                      ps.p[1].ptr(), ps.code(), p, p + s.n * groups, ptr_of(g.dg), ptr_of(g.db),
                      ptr_of(g.dv), s.nthreads);
        return first_order_only({ctx->needs_input_grad(0) ? dx : Tensor(), grad_in(g.dg, dtypes[0]),
                                 grad_in(g.db, dtypes[1]), grad_in(g.dv, dtypes[2]), Tensor(), Tensor(),
                                 Tensor(), Tensor(), Tensor()},
                                grads);
    }
};

Tensor evonorm_s0(const Tensor &x, const OptionalTensor &weight, const OptionalTensor &bias, const OptionalTensor &v,
                  int64_t groups, double eps, int64_t lay) {
    return S0Op::apply(x, weight, bias, v, groups, eps, lay);
}

// B0: y and the float64 block the backward reads (native_evonorm.B0State: mu_i, sigma_i per (n, c); mu_b, m2_b,
// sigma_b per channel); fixed_var: the variance behind sigma_b (eval), else the batch's.
// running_var: with use_batch, updated in place where the kernel takes it (running_in_kernel; the caller updates
// any other); without, the variance behind sigma_b (read in its dtype, or as a float64 copy).
struct B0Op : public torch::autograd::Function<B0Op> {
    static variable_list forward(AutogradContext *ctx, const Tensor &x, const OptionalTensor &weight,
                                 const OptionalTensor &bias, const OptionalTensor &v, const OptionalTensor &running_var,
                                 bool use_batch, double momentum, double eps, int64_t lay) {
        const size_t d = dtype_index(x);
        const int64_t n = x.size(0), c = x.size(1), numel = x.numel();
        const Tensor w = weight.value_or(Tensor()), b = bias.value_or(Tensor()), vv = v.value_or(Tensor());
        const Tensor rv = running_var.value_or(Tensor());
        TORCH_CHECK(use_batch || rv.defined(),
                    "normzoo::evonorm_b0: without the batch's variance, the running variance is needed");
        Param run;  // the buffer the kernel updates (use_batch) or reads (not)
        if (!use_batch) run = typed(rv, c, at::kDouble);
        else if (running_in_kernel(Tensor(), rv)) run = {rv, type_code(rv.scalar_type())};
        const EvoParams ps = evo_typed(c, arith_of(x), {&w, &b, &vv});
        Tensor y = at::empty_like(x);
        Tensor buf = at::empty({2 * n * c + 3 * c}, x.options().dtype(at::kDouble));
        k.b0_fwd[d](x.data_ptr(), y.data_ptr(), n, c, numel / (n * c), static_cast<int>(lay), ps.p[0].ptr(),
                    ps.p[1].ptr(), ps.p[2].ptr(), ps.code(), eps, ptr_of(run.t), run.code, use_batch ? 1 : 0, momentum,
                    buf.data_ptr<double>(), threads_for(numel));
        ctx->mark_non_differentiable({buf});
        ctx->set_materialize_grads(false);
        ctx->save_for_backward({x, w, vv, buf});
        ctx->saved_data["use_batch"] = use_batch;
        ctx->saved_data["lay"] = lay;
        ctx->saved_data["dtypes"] = std::vector<int64_t>{dtype_code(w), dtype_code(b), dtype_code(vv)};
        return {y, buf};
    }

    static variable_list backward(AutogradContext *ctx, variable_list grads) {
        if (!grads[0].defined()) return variable_list(10);  // y was not used
        const Backward s(ctx, grads[0]);
        const Tensor &w = s.saved[1], &vv = s.saved[2], &buf = s.saved[3];
        const auto dtypes = ctx->saved_data["dtypes"].toIntVector();
        Tensor dx = at::empty_like(s.x);
        const EvoParams ps = evo_typed(s.c, arith_of(s.x), {&w, &vv});
        const EvoGrads g(ctx, s.c, ps.dtype, dtypes[0] >= 0, dtypes[1] >= 0, dtypes[2] >= 0);
        k.b0_bwd[s.d](s.dy.data_ptr(), s.x.data_ptr(), dx.data_ptr(), s.n, s.c, s.l(), s.lay, ps.p[0].ptr(),
                      ps.p[1].ptr(), ps.code(), buf.data_ptr<double>(), ctx->saved_data["use_batch"].toBool() ? 1 : 0,
                      ptr_of(g.dg), ptr_of(g.db), ptr_of(g.dv), s.nthreads);
        return first_order_only({ctx->needs_input_grad(0) ? dx : Tensor(), grad_in(g.dg, dtypes[0]),
                                 grad_in(g.db, dtypes[1]), grad_in(g.dv, dtypes[2]), Tensor(), Tensor(),
                                 Tensor(), Tensor(), Tensor()},
                                {grads[0]});
    }
};

std::tuple<Tensor, Tensor> evonorm_b0(const Tensor &x, const OptionalTensor &weight, const OptionalTensor &bias,
                                      const OptionalTensor &v, const OptionalTensor &running_var, bool use_batch,
                                      double momentum, double eps, int64_t lay) {
    auto out = B0Op::apply(x, weight, bias, v, running_var, use_batch, momentum, eps, lay);
    return {out[0], out[1]};
}

// ---- for normzoo bench: the step of an op that does no work, as the operators above are applied ----
struct EmptyOp : public torch::autograd::Function<EmptyOp> {
    static Tensor forward(AutogradContext *ctx, const Tensor &x, const OptionalTensor &p0, const OptionalTensor &p1,
                          const OptionalTensor &p2, const OptionalTensor &p3) {
        ctx->save_for_backward({x, p0.value_or(Tensor()), p1.value_or(Tensor()), p2.value_or(Tensor()),
                                p3.value_or(Tensor())});
        return at::empty_like(x);
    }

    static variable_list backward(AutogradContext *ctx, variable_list grads) {
        const auto saved = ctx->get_saved_variables();
        variable_list out{at::empty_like(grads[0])};
        for (size_t i = 1; i < saved.size(); i++) out.push_back(saved[i].defined() ? at::empty_like(saved[i]) : Tensor());
        return out;
    }
};

Tensor empty_step(const Tensor &x, const OptionalTensor &p0, const OptionalTensor &p1, const OptionalTensor &p2,
                  const OptionalTensor &p3) {
    return EmptyOp::apply(x, p0, p1, p2, p3);
}

}  // namespace

TORCH_LIBRARY(normzoo, m) {
    m.def("bind(int[] addresses, int parallel_threshold) -> ()");
    m.def("group_norm(Tensor x, Tensor? weight, Tensor? bias, int groups, float eps, int mode, int lay) -> Tensor");
    m.def("group_norm_stats(Tensor x, Tensor? weight, Tensor? bias, int groups, float eps, int mode, int lay) "
          "-> (Tensor, Tensor)");
    m.def("batch_norm(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
          "float momentum, float eps, int mode, int lay) -> Tensor");
    m.def("batch_norm_stats(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
          "Tensor(b!)? running_var, float momentum, float eps, int mode, int lay, bool renorm, float r_max, "
          "float d_max, float extra_count, Tensor? extra_mean, Tensor? extra_m2) -> (Tensor, Tensor)");
    m.def("cross_iteration_norm(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
          "Tensor(b!)? running_var, float momentum, float eps, int lay, bool merge, Tensor count_p, Tensor mean_p, "
          "Tensor var_p, int slot, Tensor(c!) count_buf, Tensor(d!) mean_buf, Tensor(e!) var_buf, bool keep_old) "
          "-> (Tensor, Tensor, Tensor, Tensor)");
    m.def("row_norm(Tensor x, Tensor? weight, Tensor? bias, int d, float eps, bool rms) -> Tensor");
    m.def("switchable_norm(Tensor x, Tensor? weight, Tensor? bias, Tensor mean_logits, Tensor var_logits, "
          "Tensor(a!)? running_mean, Tensor(b!)? running_var, bool use_batch, bool training, float momentum, "
          "float eps, int lay) -> Tensor");
    m.def("filter_response_norm(Tensor x, Tensor? weight, Tensor? bias, Tensor? tau, Tensor? eps_t, float eps, "
          "int lay) -> Tensor");
    m.def("evonorm_s0(Tensor x, Tensor? weight, Tensor? bias, Tensor? v, int groups, float eps, int lay) -> Tensor");
    m.def("evonorm_b0(Tensor x, Tensor? weight, Tensor? bias, Tensor? v, Tensor(a!)? running_var, bool use_batch, "
          "float momentum, float eps, int lay) -> (Tensor, Tensor)");
    m.def("batch_norm_fixed(Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor? var, float eps, int mode, "
          "int lay) -> Tensor");
    m.def("empty_step(Tensor x, Tensor? p0, Tensor? p1, Tensor? p2, Tensor? p3) -> Tensor");
    m.def("batch_instance_norm(Tensor x, Tensor? weight, Tensor? bias, Tensor rho, Tensor(a!)? running_mean, "
          "Tensor(b!)? running_var, bool use_batch, bool training, float momentum, float eps, int lay) -> Tensor");
}

TORCH_LIBRARY_IMPL(normzoo, CatchAll, m) { m.impl("bind", bind); }

TORCH_LIBRARY_IMPL(normzoo, CompositeImplicitAutograd, m) {
    m.impl("group_norm", group_norm);
    m.impl("group_norm_stats", group_norm_stats);
    m.impl("batch_norm", batch_norm);
    m.impl("batch_norm_stats", batch_norm_stats);
    m.impl("batch_norm_fixed", batch_norm_fixed);
    m.impl("row_norm", row_norm);
    m.impl("cross_iteration_norm", cross_iteration_norm);
    m.impl("switchable_norm", switchable_norm);
    m.impl("batch_instance_norm", batch_instance_norm);
    m.impl("empty_step", empty_step);
    m.impl("evonorm_s0", evonorm_s0);
    m.impl("evonorm_b0", evonorm_b0);
    m.impl("filter_response_norm", filter_response_norm);
}

#ifdef NZ_WITH_PYTHON
// ---- Python entry points (where this is built with Python's and PyTorch's Python headers): the same operators
// called straight from Python, as the layers do. A call through torch.ops goes through its boxed path (a stack of
// IValues, the schema's checks, the dispatcher); this converts the arguments by the C++ signature and calls the
// function, the autograd included, with the GIL released: 7-11 us less a step on 2 cores (GroupNorm, 2x32x4x4 and
// 8x256x14x14). Not seen by dispatch modes (as the Python autograd ops are not); torch.ops.normzoo remains.
#include <Python.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <utility>

namespace {

template <typename T> struct PyArg;
template <> struct PyArg<const Tensor &> {
    static Tensor get(PyObject *o) {
        if (!THPVariable_Check(o)) throw std::invalid_argument("normzoo: expected a tensor argument");
        return THPVariable_Unpack(o);
    }
};
template <> struct PyArg<const OptionalTensor &> {
    static OptionalTensor get(PyObject *o) { return o == Py_None ? OptionalTensor() : PyArg<const Tensor &>::get(o); }
};
template <> struct PyArg<int64_t> {
    static int64_t get(PyObject *o) {
        const int64_t v = PyLong_AsLongLong(o);
        if (v == -1 && PyErr_Occurred()) throw python_error();
        return v;
    }
};
template <> struct PyArg<double> {
    static double get(PyObject *o) {
        const double v = PyFloat_AsDouble(o);
        if (v == -1.0 && PyErr_Occurred()) throw python_error();
        return v;
    }
};
template <> struct PyArg<bool> {
    static bool get(PyObject *o) {
        const int v = PyObject_IsTrue(o);
        if (v < 0) throw python_error();
        return v != 0;
    }
};

PyObject *wrap(Tensor t) { return THPVariable_Wrap(std::move(t)); }
template <typename... T, size_t... I> PyObject *wrap_items(std::tuple<T...> &t, std::index_sequence<I...>) {
    PyObject *items[] = {wrap(std::move(std::get<I>(t)))...};
    PyObject *tuple = PyTuple_New(sizeof...(T));
    for (size_t i = 0; i < sizeof...(T); i++) PyTuple_SET_ITEM(tuple, i, items[i]);  // (steals the references)
    return tuple;
}
template <typename... T> PyObject *wrap(std::tuple<T...> t) { return wrap_items(t, std::index_sequence_for<T...>{}); }

template <auto F> struct Entry;
template <typename R, typename... A, R (*F)(A...)> struct Entry<F> {
    template <size_t... I> static R call(PyObject *const *args, std::index_sequence<I...>) {
        auto converted = std::make_tuple(PyArg<A>::get(args[I])...);  // with the GIL
        pybind11::gil_scoped_release no_gil;
        return F(std::get<I>(converted)...);
    }
    static PyObject *fn(PyObject *, PyObject *const *args, Py_ssize_t n) {
        HANDLE_TH_ERRORS
        if (n != static_cast<Py_ssize_t>(sizeof...(A)))
            return PyErr_Format(PyExc_TypeError, "expected %zd arguments, got %zd", (Py_ssize_t)sizeof...(A), n);
        return wrap(call(args, std::index_sequence_for<A...>{}));
        END_HANDLE_TH_ERRORS
    }
};

#define NZ_ENTRY(f) {#f, (PyCFunction)(void (*)(void))Entry<f>::fn, METH_FASTCALL, nullptr}
PyMethodDef nz_py_ops[] = {
    NZ_ENTRY(group_norm),     NZ_ENTRY(group_norm_stats),     NZ_ENTRY(batch_norm), NZ_ENTRY(batch_norm_stats),
    NZ_ENTRY(batch_norm_fixed), NZ_ENTRY(row_norm), NZ_ENTRY(cross_iteration_norm), NZ_ENTRY(switchable_norm),
    NZ_ENTRY(batch_instance_norm), NZ_ENTRY(filter_response_norm), NZ_ENTRY(evonorm_s0), NZ_ENTRY(evonorm_b0),
    NZ_ENTRY(empty_step),     {nullptr, nullptr, 0, nullptr}};
PyModuleDef nz_py_module = {PyModuleDef_HEAD_INIT, "_normzoo_ops", nullptr, -1, nz_py_ops};

}  // namespace

PyMODINIT_FUNC PyInit__normzoo_ops(void) { return PyModule_Create(&nz_py_module); }
#endif
