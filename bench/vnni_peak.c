/* Peak AVX512-VNNI throughput of one core: 12 independent chains of 512-bit vpdpbusd (64 u8 x s8 MACs,
 * 128 ops each). bench/speed_x86.py compiles it, runs one copy per core at once and sums the results.
 * Build: cc -O2 -mavx512f -mavx512bw -mavx512vnni vnni_peak.c -o vnni_peak; run: ./vnni_peak [iterations] */
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

#define CHAIN(c) c = _mm512_dpbusd_epi32(c, a, b)

int main(int argc, char **argv) {
  long n = argc > 1 ? atol(argv[1]) : 100000000L;
  __m512i a = _mm512_set1_epi8(1), b = _mm512_set1_epi8(2);
  __m512i c0 = _mm512_setzero_si512(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0;
  __m512i c6 = c0, c7 = c0, c8 = c0, c9 = c0, c10 = c0, c11 = c0;
  double start = now();
  for (long i = 0; i < n; i++) {
    CHAIN(c0); CHAIN(c1); CHAIN(c2); CHAIN(c3); CHAIN(c4); CHAIN(c5);
    CHAIN(c6); CHAIN(c7); CHAIN(c8); CHAIN(c9); CHAIN(c10); CHAIN(c11);
    __asm__ volatile("" : "+v"(c0), "+v"(c1), "+v"(c2), "+v"(c3), "+v"(c4), "+v"(c5), "+v"(c6), "+v"(c7),
                     "+v"(c8), "+v"(c9), "+v"(c10), "+v"(c11));
  }
  double seconds = now() - start;
  __m512i sum = _mm512_add_epi32(_mm512_add_epi32(c0, c1), _mm512_add_epi32(c10, c11));
  /* GOP/s, then a checksum that keeps the chains live */
  printf("%.2f %d\n", n * 12 * 128.0 / seconds / 1e9, _mm512_reduce_add_epi32(sum));
  return 0;
}
