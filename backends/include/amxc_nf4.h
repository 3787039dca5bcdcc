// NF4 constants and scale bookkeeping shared by every tier (formats: ir/formats/nf4.py).
#pragma once
#include <stdint.h>
#include <string.h>

namespace amxc {

// round(127 * NF4 value): the int8 weight table of the int8 dot-product kernels
alignas(16) static const int8_t NF4_I8[16] = {-127, -88, -67, -50, -36, -23, -12, 0,
                                              10, 20, 31, 43, 56, 71, 92, 127};
// the same +128, as unsigned bytes (u8 x s8 dot products: vpdpbusd, AMX tdpbusd)
alignas(16) static const uint8_t NF4_U8[16] = {1, 40, 61, 78, 92, 105, 116, 128,
                                               138, 148, 159, 171, 184, 199, 220, 255};
// the exact NF4 values (bitsandbytes' table, as float32 bit patterns)
alignas(64) static const uint32_t NF4_F32_BITS[16] = {
    0xBF800000u, 0xBF3239B1u, 0xBF066B30u, 0xBECA32A0u, 0xBE91A24Du, 0xBE3D353Fu, 0xBDBA7871u, 0x00000000u,
    0x3DA2FAFFu, 0x3E24CAE3u, 0x3E7C04DDu, 0x3EAD033Au, 0x3EE1A4B8u, 0x3F1007ABu, 0x3F3913B3u, 0x3F800000u};

static inline float nf4_value(int c) { float f; memcpy(&f, &NF4_F32_BITS[c], 4); return f; }

// E4M3FN code -> float (no NaN code occurs in scales): the bits shifted into an fp32 whose
// exponent is 120 too small, times 2^120 (exact, also for E4M3 subnormals: DAZ is never set)
static inline float decode_e4m3(uint8_t q) {
  uint32_t bits = (uint32_t)(q & 0x7F) << 20;
  float f;
  memcpy(&f, &bits, 4);
  return f * 0x1p120f;
}

// The second-level (fp32) scale of each of the 16 rows of an r16k4 row group at block b:
// scales2 run flat over row-major blocks, one per `sb` blocks, so a lane switches to its next
// scale when its flat block index crosses a multiple of sb.  at(b) is cheap between switches.
struct GroupScales16 {
  float lane[16];
  int64_t next[16], soonest;
  const float* s2;
  int64_t g, n, nb, sb;

  GroupScales16(const float* s2_, int64_t g_, int64_t n_, int64_t nb_, int64_t sb_)
      : s2(s2_), g(g_), n(n_), nb(nb_), sb(sb_) {
    for (int l = 0; l < 16; ++l) load(l, 0);
    update_soonest();
  }
  void load(int l, int64_t b) {
    const int64_t row = g * 16 + l;
    if (row >= n) { lane[l] = 0.0f; next[l] = INT64_MAX; return; }
    const int64_t flat = row * nb + b, grp = flat / sb;
    lane[l] = s2[grp];
    next[l] = (grp + 1) * sb - row * nb;          // first block of the lane's next group
  }
  void update_soonest() {
    soonest = next[0];
    for (int l = 1; l < 16; ++l) soonest = next[l] < soonest ? next[l] : soonest;
  }
  // true if some lane changed at block b
  bool advance(int64_t b) {
    if (b < soonest) return false;
    for (int l = 0; l < 16; ++l) if (next[l] <= b) load(l, b);
    update_soonest();
    return true;
  }
};

}  // namespace amxc
