// Runs the f64 instances of every kernel file on the CPU through shim.h: reads a command
// and its inputs (whitespace-separated numbers) and prints the outputs, one number a line.
//   pool B C H W GRID                 x, grad_y          -> y, grad_x
//   bias OUTER LEN INNER RELU PER_CHUNK GRID   x, bias, grad  -> y, y in place, masked, bias grad
//   sgd N LR MOMENTUM WEIGHT_DECAY NESTEROV GRID  w, grad, buf -> buf, w (both passes)
//   bn B C HW PER_CHUNK GRID MOMENTUM   x, weight, bias, grad, running mean, running var
//        -> y (training), statistics (means, variances), dx, dweight, dbias,
//           running mean, running var (updated), y (evaluation, from the updated statistics)
//   ce ROWS K SMOOTHING GRID   logits, targets, grad -> loss, d logits
//   celabels ROWS K SMOOTHING GRID   logits, labels, grad -> loss, d logits
//   attn B N D C CC SCALE      q, k, v, dout -> out, lse, dq, dk, dv
//   adamw N B1 B2 EPS DECAY STEP SQRT_BIAS2 GRID   w, grad, m, v -> m, v, w
//   squares CHUNKS LEN...    the table (pointers 0), each tensor -> each sum of squares
//   sgdmany MOMENTUM NESTEROV CHUNKS LEN...   the table (pointers 0), rates, then each
//        parameter's w, grad, buf -> each buf, then each w
//   adamwmany BETA1 BETA2 CHUNKS LEN...   the table (pointers 0), factors (4 a parameter),
//        then each parameter's w, grad, m, v -> each m, each v, each w
//   gemm BATCH A_LEN B_LEN C_LEN BIAS_LEN and GemmShape's 17 fields   a, b, c, bias -> c
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <string>

#include "shim.h"
#include "../pool.cu"
#include "../bias_act.cu"
#include "../sgd.cu"
#include "../batch_norm.cu"
#include "../cross_entropy.cu"
#include "../attention.cu"
#include "../gemm.cu"
#include "../adamw.cu"
#include "../squares.cu"

static std::vector<double> read(int64_t n) {
    std::vector<double> v(n);
    for (auto& x : v) std::cin >> x;
    if (!std::cin) {
        std::fprintf(stderr, "harness: expected %lld numbers on stdin\n", (long long)n);
        std::exit(2);
    }
    return v;
}

static void print(const std::vector<double>& v) {
    for (double x : v) std::printf("%.17g\n", x);
}

int main(int argc, char** argv) {
    const std::string cmd = argc > 1 ? argv[1] : "";
    auto arg = [&](int i) { return (int64_t)std::atoll(argv[i]); };
    const dim3 block{256, 1, 1};
    if (cmd == "pool" && argc == 7) {
        const int64_t b = arg(2), c = arg(3), h = arg(4), w = arg(5);
        const dim3 grid{(unsigned)arg(6), 1, 1};
        const auto x = read(b * c * h * w);
        const auto grad_y = read(b * c * (h / 2) * (w / 2));
        std::vector<double> y(grad_y.size()), grad_x(x.size());
        launch(grid, block, [&] { max_pool_2x2_forward_f64(x.data(), y.data(), b * c, h, w); });
        launch(grid, block, [&] {
            max_pool_2x2_backward_f64(x.data(), grad_y.data(), grad_x.data(), b * c, h, w);
        });
        print(y);
        print(grad_x);
        return 0;
    }
    if (cmd == "bias" && argc == 8) {
        const int64_t outer = arg(2), len = arg(3), inner = arg(4), per_chunk = arg(6);
        const int relu = (int)arg(5);
        const dim3 grid{(unsigned)arg(7), 1, 1};
        const int64_t n = outer * len * inner;
        const auto x = read(n);
        const auto bias = read(len);
        const auto grad = read(n);
        std::vector<double> y(n), in_place = x;
        launch(grid, block, [&] {
            bias_act_forward_f64(x.data(), y.data(), bias.data(), len, inner, n, relu);
        });
        launch(grid, block, [&] {
            bias_act_forward_f64(nullptr, in_place.data(), bias.data(), len, inner, n, relu);
        });
        const int64_t chunks = std::max<int64_t>(1, (outer * inner + per_chunk - 1) / per_chunk);
        std::vector<double> masked(n), partials(chunks * len), bias_grad(len);
        launch({(unsigned)chunks, (unsigned)len, 1}, block, [&] {
            bias_act_backward_f64(grad.data(), relu ? y.data() : nullptr, masked.data(),
                                  partials.data(), outer, len, inner, per_chunk, relu);
        });
        launch(grid, block, [&] { sum_rows_f64(partials.data(), bias_grad.data(), len, chunks); });
        print(y);
        print(in_place);
        print(masked);
        print(bias_grad);
        return 0;
    }
    if (cmd == "sgd" && argc == 8) {
        const int64_t n = arg(2);
        const double lr = std::atof(argv[3]), momentum = std::atof(argv[4]);
        const double weight_decay = std::atof(argv[5]);
        const int nesterov = (int)arg(6);
        const dim3 grid{(unsigned)arg(7), 1, 1};
        auto w = read(n);
        const auto grad = read(n);
        auto buf = read(n);
        launch(grid, block, [&] {
            sgd_buffer_f64(buf.data(), grad.data(), w.data(), n, momentum, weight_decay);
        });
        launch(grid, block, [&] {
            sgd_weight_f64(w.data(), grad.data(), buf.data(), n, lr, momentum, weight_decay,
                           nesterov);
        });
        print(buf);
        print(w);
        return 0;
    }
    if (cmd == "bn" && argc == 8) {
        const int64_t b = arg(2), c = arg(3), hw = arg(4), per_chunk = arg(5);
        const dim3 grid{(unsigned)arg(6), 1, 1};
        const double momentum = std::atof(argv[7]), eps = 1e-5;
        const int64_t n = b * c * hw, count = b * hw;
        const int64_t chunks = std::max<int64_t>(1, (count + per_chunk - 1) / per_chunk);
        const auto x = read(n);
        const auto weight = read(c);
        const auto bias = read(c);
        const auto grad = read(n);
        auto running_mean = read(c);
        auto running_var = read(c);
        std::vector<double> partials(2 * chunks * c), stats(2 * c), scale(c), shift(c), y(n);
        const dim3 per_channel{(unsigned)chunks, (unsigned)c, 1};
        launch(per_channel, block, [&] {
            bn_chunk_stats_f64(x.data(), partials.data(), b, c, hw, per_chunk);
        });
        launch(grid, block, [&] {
            bn_finish_stats_f64(partials.data(), stats.data(), scale.data(), shift.data(),
                                weight.data(), bias.data(), c, chunks, count, per_chunk, eps);
        });
        launch(grid, block, [&] {
            bn_relu_apply_f64(x.data(), y.data(), scale.data(), shift.data(), c, hw, n);
        });
        std::vector<double> sums(2 * c), dweight(c), dbias(c), dx(n);
        launch(per_channel, block, [&] {
            bn_backward_chunks_f64(x.data(), y.data(), grad.data(), stats.data(),
                                   partials.data(), b, c, hw, per_chunk, eps);
        });
        launch(grid, block, [&] {
            bn_backward_sums_f64(partials.data(), sums.data(), dweight.data(), dbias.data(), c,
                                 chunks);
        });
        launch(grid, block, [&] {
            bn_backward_input_f64(x.data(), y.data(), grad.data(), weight.data(), stats.data(),
                                  sums.data(), dx.data(), c, hw, n, (double)count, eps);
        });
        const double unbiased = count > 1 ? (double)count / (double)(count - 1) : 1.0;
        launch(grid, block, [&] {
            bn_running_update_f64(running_mean.data(), stats.data(), c, momentum, 1.0);
        });
        launch(grid, block, [&] {
            bn_running_update_f64(running_var.data(), stats.data() + c, c, momentum, unbiased);
        });
        std::vector<double> y_eval(n);
        launch(grid, block, [&] {
            bn_eval_factors_f64(running_mean.data(), running_var.data(), scale.data(),
                                shift.data(), weight.data(), bias.data(), c, eps);
        });
        launch(grid, block, [&] {
            bn_relu_apply_f64(x.data(), y_eval.data(), scale.data(), shift.data(), c, hw, n);
        });
        for (const auto* v : {&y, &stats, &dx, &dweight, &dbias, &running_mean, &running_var,
                              &y_eval})
            print(*v);
        return 0;
    }
    if (cmd == "ce" && argc == 6) {
        const int64_t rows = arg(2), k = arg(3);
        const double smoothing = std::atof(argv[4]);
        const dim3 grid{(unsigned)arg(5), 1, 1};
        const auto logits = read(rows * k);
        const auto targets = read(rows * k);
        const auto grad = read(1);
        std::vector<double> row_stats(3 * rows), loss(1), dlogits(rows * k);
        launch({(unsigned)rows, 1, 1}, block, [&] {
            cross_entropy_rows_f64(logits.data(), targets.data(), nullptr, row_stats.data(), k,
                                   smoothing);
        });
        launch({1, 1, 1}, block, [&] { cross_entropy_mean_f64(row_stats.data(), loss.data(), rows); });
        launch(grid, block, [&] {
            cross_entropy_backward_f64(logits.data(), targets.data(), nullptr, row_stats.data(),
                                       grad.data(), dlogits.data(), rows, k, smoothing);
        });
        print(loss);
        print(dlogits);
        return 0;
    }
    if (cmd == "attn" && argc == 8) {
        const int64_t b = arg(2), n = arg(3), c = arg(5);
        const int d = (int)arg(4), cc = (int)arg(6);
        const double scale = std::atof(argv[7]);
        const auto q = read(b * n * d);
        const auto k = read(b * n * d);
        const auto v = read(b * n * c);
        const auto dout = read(b * n * c);
        std::vector<double> out(b * n * c), lse(b * n), delta(b * n);
        std::vector<double> dq(b * n * d), dk(b * n * d), dv(b * n * c);
        const dim3 tiles{(unsigned)((n + TILE - 1) / TILE), (unsigned)b, 1};
        launch(tiles, block, [&] {
            attn_forward_f64(q.data(), k.data(), v.data(), out.data(), lse.data(), n, d, c, cc,
                             scale);
        });
        launch({2, 1, 1}, block, [&] {
            attn_delta_f64(out.data(), dout.data(), delta.data(), b * n, c);
        });
        launch(tiles, block, [&] {
            attn_backward_dq_f64(q.data(), k.data(), v.data(), dout.data(), lse.data(),
                                 delta.data(), dq.data(), n, d, c, cc, scale);
        });
        launch(tiles, block, [&] {
            attn_backward_dkv_f64(q.data(), k.data(), v.data(), dout.data(), lse.data(),
                                  delta.data(), dk.data(), dv.data(), n, d, c, cc, scale);
        });
        for (const auto* x : {&out, &lse, &dq, &dk, &dv}) print(*x);
        return 0;
    }
    if (cmd == "gemm" && argc == 24) {
        const int64_t batch = arg(2);
        const auto a = read(arg(3));
        const auto b = read(arg(4));
        auto c = read(arg(5));
        const auto bias = read(arg(6));
        int64_t f[17];
        for (int i = 0; i < 17; ++i) f[i] = arg(7 + i);
        const GemmShape s{f[0], f[1], f[2], f[3], f[4], f[5], f[6], f[7], f[8],
                          f[9], f[10], f[11], f[12], f[13], f[14], (int32_t)f[15], (int32_t)f[16]};
        const dim3 grid{(unsigned)((s.n + GEMM_TILE - 1) / GEMM_TILE),
                        (unsigned)((s.m + GEMM_TILE - 1) / GEMM_TILE), (unsigned)batch};
        launch(grid, block, [&] { gemm_strided_f64(a.data(), b.data(), c.data(), bias.data(), s); });
        print(c);
        return 0;
    }
    if (cmd == "adamw" && argc == 10) {
        const int64_t n = arg(2);
        double f[6];
        for (int i = 0; i < 6; ++i) f[i] = std::atof(argv[3 + i]);
        const dim3 grid{(unsigned)arg(9), 1, 1};
        auto w = read(n);
        const auto g = read(n);
        auto m = read(n);
        auto v = read(n);
        launch(grid, block, [&] { adamw_moment_f64(m.data(), g.data(), n, f[0], 0); });
        launch(grid, block, [&] { adamw_moment_f64(v.data(), g.data(), n, f[1], 1); });
        launch(grid, block, [&] {
            adamw_weight_f64(w.data(), m.data(), v.data(), n, f[3], f[4], f[5], f[2]);
        });
        print(m);
        print(v);
        print(w);
        return 0;
    }
    if (cmd == "squares" && argc >= 4) {
        const int64_t chunks = arg(2), n = argc - 3;
        const auto table_values = read(n + 3 * chunks + n + 1);
        std::vector<int64_t> table(table_values.begin(), table_values.end());
        std::vector<std::vector<double>> tensors;
        for (int64_t t = 0; t < n; ++t) tensors.push_back(read(arg(3 + t)));
        for (int64_t t = 0; t < n; ++t) table[t] = (int64_t)tensors[t].data();
        std::vector<double> partials(std::max<int64_t>(chunks, 1)), out(n);
        if (chunks > 0)
            launch({(unsigned)chunks, 1, 1}, block, [&] {
                chunk_squares_f64(table.data(), n, chunks, partials.data());
            });
        launch({1, 1, 1}, block, [&] {
            sum_chunks_all(table.data(), n, chunks, partials.data(), out.data());
        });
        print(out);
        return 0;
    }
    if (cmd == "sgdmany" && argc >= 6) {
        const double momentum = std::atof(argv[2]);
        const int nesterov = (int)arg(3);
        const int64_t chunks = arg(4), n = argc - 5;
        const auto table_values = read(3 * n + 3 * chunks + n + 1);
        std::vector<int64_t> table(table_values.begin(), table_values.end());
        const auto rates = read(2 * n);
        std::vector<std::vector<double>> w, g, b;
        for (int64_t t = 0; t < n; ++t) {
            w.push_back(read(arg(5 + t)));
            g.push_back(read(arg(5 + t)));
            b.push_back(read(arg(5 + t)));
        }
        for (int64_t t = 0; t < n; ++t) {
            table[t] = (int64_t)w[t].data();
            table[n + t] = (int64_t)g[t].data();
            table[2 * n + t] = (int64_t)b[t].data();
        }
        std::vector<int64_t> rate_bits(rates.size());
        std::memcpy(rate_bits.data(), rates.data(), rates.size() * sizeof(double));
        if (chunks > 0)
            launch({(unsigned)chunks, 1, 1}, block, [&] {
                sgd_many_f64(table.data(), rate_bits.data(), n, chunks, momentum, nesterov);
            });
        for (const auto& v : b) print(v);
        for (const auto& v : w) print(v);
        return 0;
    }
    if (cmd == "celabels" && argc == 6) {
        const int64_t rows = arg(2), k = arg(3);
        const double smoothing = std::atof(argv[4]);
        const dim3 grid{(unsigned)arg(5), 1, 1};
        const auto logits = read(rows * k);
        const auto label_values = read(rows);
        const std::vector<uint32_t> labels(label_values.begin(), label_values.end());
        const auto grad = read(1);
        std::vector<double> row_stats(3 * rows), loss(1), dlogits(rows * k);
        launch({(unsigned)rows, 1, 1}, block, [&] {
            cross_entropy_rows_f64(logits.data(), nullptr, labels.data(), row_stats.data(), k,
                                   smoothing);
        });
        launch({1, 1, 1}, block, [&] { cross_entropy_mean_f64(row_stats.data(), loss.data(), rows); });
        launch(grid, block, [&] {
            cross_entropy_backward_f64(logits.data(), nullptr, labels.data(), row_stats.data(),
                                       grad.data(), dlogits.data(), rows, k, smoothing);
        });
        print(loss);
        print(dlogits);
        return 0;
    }
    if (cmd == "adamwmany" && argc >= 6) {
        const double beta1 = std::atof(argv[2]), beta2 = std::atof(argv[3]);
        const int64_t chunks = arg(4), n = argc - 5;
        const auto table_values = read(4 * n + 3 * chunks + n + 1);
        std::vector<int64_t> table(table_values.begin(), table_values.end());
        const auto factors = read(4 * n);
        std::vector<int64_t> factor_bits(factors.size());
        std::memcpy(factor_bits.data(), factors.data(), factors.size() * sizeof(double));
        std::vector<std::vector<double>> columns[4];
        for (int64_t t = 0; t < n; ++t)
            for (auto& column : columns) column.push_back(read(arg(5 + t)));
        for (int c = 0; c < 4; ++c)
            for (int64_t t = 0; t < n; ++t) table[c * n + t] = (int64_t)columns[c][t].data();
        if (chunks > 0)
            launch({(unsigned)chunks, 1, 1}, block, [&] {
                adamw_many_f64(table.data(), factor_bits.data(), n, chunks, beta1, beta2);
            });
        for (int c : {2, 3, 0})
            for (const auto& v : columns[c]) print(v);
        return 0;
    }
    std::fprintf(stderr, "usage: harness pool B C H W GRID | bias OUTER LEN INNER RELU PER_CHUNK GRID | sgd N LR MOMENTUM WEIGHT_DECAY NESTEROV GRID | bn B C HW PER_CHUNK GRID MOMENTUM | ce ROWS K SMOOTHING GRID | celabels ROWS K SMOOTHING GRID | attn B N D C CC SCALE | adamw ... | squares ... | sgdmany ... | adamwmany ... | gemm ...\n");
    return 2;
}
