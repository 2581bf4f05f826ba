// Runs the f64 instances of pool.cu, bias_act.cu and sgd.cu on the CPU through shim.h: reads a command
// and its inputs (whitespace-separated numbers) and prints the outputs, one number a line.
//   pool B C H W GRID                 x, grad_y          -> y, grad_x
//   bias OUTER LEN INNER RELU PER_CHUNK GRID   x, bias, grad  -> y, y in place, masked, bias grad
//   sgd N LR MOMENTUM WEIGHT_DECAY NESTEROV GRID  w, grad, buf -> buf, w (both passes)
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <string>

#include "shim.h"
#include "../pool.cu"
#include "../bias_act.cu"
#include "../sgd.cu"

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
    std::fprintf(stderr, "usage: harness pool B C H W GRID | bias OUTER LEN INNER RELU PER_CHUNK GRID | sgd N LR MOMENTUM WEIGHT_DECAY NESTEROV GRID\n");
    return 2;
}
