// AMX tiles, natively or in software.
//
// Kernels include this instead of using the tile intrinsics from <immintrin.h> directly.  Built
// natively (-mamx-tile -mamx-bf16 -mamx-int8), the intrinsics are the real instructions.  Built
// with -DAMX_EMULATE, the same kernel source runs on any x86-64 through a per-thread software
// model of the tile registers that follows the SDM's operation sections (research/amx_nf4.md
// §2.3-2.4, §4): TDPBF16PS as two fp32 FMA chains (even and odd bf16 of each pair) over the
// instruction's K, added and then accumulated into C, DAZ on inputs and FTZ on outputs by bit
// tests (never MXCSR); TDPB[SU][SU]D as exact int32 sums that wrap.  The emulator faults, with a
// message, on what hardware faults on: a bad tile config, unconfigured tiles, mismatched shapes.
//
// AMX_LOADD is the tile load to use on a buffer written just before: GCC's _tile_loadd has no
// memory operand, so the compiler may sink stores past it; a compiler barrier comes first.
#pragma once
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct amx_tilecfg {
  uint8_t palette_id, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

#ifndef AMX_EMULATE

#define AMX_LOADD(t, base, stride) do { __asm__ volatile("" ::: "memory"); _tile_loadd(t, base, stride); } while (0)

#else  // ------------------------------------------------------------------ software tiles

struct amx_emu_state {
  uint8_t d[8][16][64];
  uint16_t colsb[8];
  uint8_t rows[8];
  int configured;
};
static thread_local amx_emu_state amx_emu;

[[noreturn]] static inline void amx_emu_fault(const char* what) {
  fprintf(stderr, "amx emulator: %s\n", what);
  abort();
}

static inline void amx_emu_loadconfig(const void* p) {
  amx_tilecfg c;
  memcpy(&c, p, sizeof c);
  if (c.palette_id > 1) amx_emu_fault("ldtilecfg: palette must be 0 or 1 (#GP)");
  for (int i = 0; i < 14; ++i) if (c.reserved[i]) amx_emu_fault("ldtilecfg: reserved bytes must be 0 (#GP)");
  if (c.start_row) amx_emu_fault("ldtilecfg: start_row must be 0");
  for (int t = 8; t < 16; ++t) if (c.colsb[t] || c.rows[t]) amx_emu_fault("ldtilecfg: tiles 8-15 must be 0 (#GP)");
  for (int t = 0; t < 8; ++t) {
    if (c.rows[t] > 16 || c.colsb[t] > 64) amx_emu_fault("ldtilecfg: a tile exceeds 16 rows x 64 bytes (#GP)");
    if ((c.rows[t] == 0) != (c.colsb[t] == 0)) amx_emu_fault("ldtilecfg: rows and colsb must both be 0 or both set (#GP)");
    amx_emu.rows[t] = c.palette_id ? c.rows[t] : 0;
    amx_emu.colsb[t] = c.palette_id ? c.colsb[t] : 0;
  }
  memset(amx_emu.d, 0, sizeof amx_emu.d);
  amx_emu.configured = c.palette_id == 1;
}

static inline void amx_emu_release() {
  memset(&amx_emu, 0, sizeof amx_emu);
}

static inline void amx_emu_check(int t, const char* op) {
  if (!amx_emu.configured) { fprintf(stderr, "amx emulator: %s before ldtilecfg\n", op); abort(); }
  if (t < 0 || t > 7 || amx_emu.rows[t] == 0) { fprintf(stderr, "amx emulator: %s on unconfigured tile %d\n", op, t); abort(); }
}

static inline void amx_emu_loadd(int t, const void* base, long stride) {
  amx_emu_check(t, "tileloadd");
  memset(amx_emu.d[t], 0, sizeof amx_emu.d[t]);
  for (int r = 0; r < amx_emu.rows[t]; ++r)
    memcpy(amx_emu.d[t][r], (const uint8_t*)base + (long)r * stride, amx_emu.colsb[t]);
}

static inline void amx_emu_stored(int t, void* base, long stride) {
  amx_emu_check(t, "tilestored");
  for (int r = 0; r < amx_emu.rows[t]; ++r)
    memcpy((uint8_t*)base + (long)r * stride, amx_emu.d[t][r], amx_emu.colsb[t]);
}

static inline void amx_emu_zero(int t) {
  amx_emu_check(t, "tilezero");
  memset(amx_emu.d[t], 0, sizeof amx_emu.d[t]);
}

// C[M x N] += A[M x K] . B[K x N] with K counted in dwords (pairs of bf16, quads of int8)
static inline void amx_emu_shape(int c, int a, int b, const char* op) {
  amx_emu_check(c, op); amx_emu_check(a, op); amx_emu_check(b, op);
  if (c == a || c == b || a == b) { fprintf(stderr, "amx emulator: %s needs three distinct tiles (#UD)\n", op); abort(); }
  if (amx_emu.rows[c] != amx_emu.rows[a]) { fprintf(stderr, "amx emulator: %s M: dst.rows != src1.rows (#UD)\n", op); abort(); }
  if (amx_emu.colsb[c] != amx_emu.colsb[b]) { fprintf(stderr, "amx emulator: %s N: dst.colsb != src2.colsb (#UD)\n", op); abort(); }
  if (amx_emu.colsb[a] / 4 != amx_emu.rows[b]) { fprintf(stderr, "amx emulator: %s K: src1.colsb/4 != src2.rows (#UD)\n", op); abort(); }
}

static inline float amx_emu_f32(uint32_t bits) { float f; memcpy(&f, &bits, 4); return f; }
static inline uint32_t amx_emu_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float amx_emu_flush(float f) {            // DAZ / FTZ: a zero exponent is a zero
  const uint32_t u = amx_emu_bits(f);
  return (u & 0x7F800000u) ? f : amx_emu_f32(u & 0x80000000u);
}

static inline void amx_emu_dpbf16ps(int c, int a, int b) {
  amx_emu_shape(c, a, b, "tdpbf16ps");
  const int M = amx_emu.rows[c], N = amx_emu.colsb[c] / 4, K = amx_emu.colsb[a] / 4;
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      float t0 = 0.0f, t1 = 0.0f;
      for (int k = 0; k < K; ++k) {
        uint16_t a0, a1, b0, b1;
        memcpy(&a0, &amx_emu.d[a][m][4 * k], 2); memcpy(&a1, &amx_emu.d[a][m][4 * k + 2], 2);
        memcpy(&b0, &amx_emu.d[b][k][4 * n], 2); memcpy(&b1, &amx_emu.d[b][k][4 * n + 2], 2);
        t0 = amx_emu_flush(fmaf(amx_emu_flush(amx_emu_f32((uint32_t)a0 << 16)),
                                amx_emu_flush(amx_emu_f32((uint32_t)b0 << 16)), t0));
        t1 = amx_emu_flush(fmaf(amx_emu_flush(amx_emu_f32((uint32_t)a1 << 16)),
                                amx_emu_flush(amx_emu_f32((uint32_t)b1 << 16)), t1));
      }
      float acc;
      memcpy(&acc, &amx_emu.d[c][m][4 * n], 4);
      acc = amx_emu_flush(amx_emu_flush(acc) + amx_emu_flush(t0 + t1));
      memcpy(&amx_emu.d[c][m][4 * n], &acc, 4);
    }
}

// signedness of A and B bytes: SS, SU, US, UU
template <bool SA, bool SB>
static inline void amx_emu_dpb(int c, int a, int b, const char* op) {
  amx_emu_shape(c, a, b, op);
  const int M = amx_emu.rows[c], N = amx_emu.colsb[c] / 4, K = amx_emu.colsb[a] / 4;
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      uint32_t acc;
      memcpy(&acc, &amx_emu.d[c][m][4 * n], 4);
      for (int k = 0; k < K; ++k)
        for (int i = 0; i < 4; ++i) {
          const uint8_t x = amx_emu.d[a][m][4 * k + i], y = amx_emu.d[b][k][4 * n + i];
          const int32_t xv = SA ? (int32_t)(int8_t)x : (int32_t)x, yv = SB ? (int32_t)(int8_t)y : (int32_t)y;
          acc += (uint32_t)(xv * yv);                   // 32-bit wrap-around, no saturation
        }
      memcpy(&amx_emu.d[c][m][4 * n], &acc, 4);
    }
}

#undef _tile_loadd
#undef _tile_stream_loadd
#undef _tile_stored
#undef _tile_zero
#undef _tile_dpbf16ps
#undef _tile_dpbssd
#undef _tile_dpbsud
#undef _tile_dpbusd
#undef _tile_dpbuud
#define _tile_loadconfig(cfg) amx_emu_loadconfig(cfg)
#define _tile_release() amx_emu_release()
#define _tile_loadd(t, base, stride) amx_emu_loadd(t, base, stride)
#define _tile_stream_loadd(t, base, stride) amx_emu_loadd(t, base, stride)
#define _tile_stored(t, base, stride) amx_emu_stored(t, base, stride)
#define _tile_zero(t) amx_emu_zero(t)
#define _tile_dpbf16ps(c, a, b) amx_emu_dpbf16ps(c, a, b)
#define _tile_dpbssd(c, a, b) amx_emu_dpb<true, true>(c, a, b, "tdpbssd")
#define _tile_dpbsud(c, a, b) amx_emu_dpb<true, false>(c, a, b, "tdpbsud")
#define _tile_dpbusd(c, a, b) amx_emu_dpb<false, true>(c, a, b, "tdpbusd")
#define _tile_dpbuud(c, a, b) amx_emu_dpb<false, false>(c, a, b, "tdpbuud")
#define AMX_LOADD(t, base, stride) amx_emu_loadd(t, base, stride)

#endif  // AMX_EMULATE
