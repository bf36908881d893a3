/* Peak AMX-INT8 throughput of one core: tdpbusd on 4 independent accumulator tiles (each 16 x 16 int32 from a
 * 16 x 64 u8 tile times a 16 x 64 s8 tile: 16384 MACs, 32768 ops per instruction), operands kept in tiles.
 * The process first asks Linux for the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM, XTILEDATA), as every
 * tvmquant process that runs AMX kernels does; without amx_int8 it says so and exits with status 2 (no SIGILL).
 * bench/speed_x86.py compiles it, runs one copy per core at once and sums the results.
 * Build: cc -O2 -mamx-tile -mamx-int8 amx_peak.c -o amx_peak; run: ./amx_peak [iterations] */
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static int cpu_has_amx_int8(void) {
  FILE *f = fopen("/proc/cpuinfo", "r");
  char line[8192];
  int found = 0;
  if (!f) return 0;
  while (fgets(line, sizeof line, f))
    if (strncmp(line, "flags", 5) == 0) {
      found = strstr(line, " amx_int8") != NULL && strstr(line, " amx_tile") != NULL;
      break;
    }
  fclose(f);
  return found;
}

typedef struct {
  uint8_t palette_id, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
} tile_config;

int main(int argc, char **argv) {
  long n = argc > 1 ? atol(argv[1]) : 20000000L;
  if (!cpu_has_amx_int8()) {
    fprintf(stderr, "amx_peak: this CPU has no amx_int8\n");
    return 2;
  }
  if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0) {
    fprintf(stderr, "amx_peak: Linux refused the AMX tile state (arch_prctl)\n");
    return 2;
  }
  static uint8_t a[16 * 64], b[16 * 64];
  static int32_t c[16 * 16];
  memset(a, 1, sizeof a);
  memset(b, 2, sizeof b);
  tile_config cfg;
  memset(&cfg, 0, sizeof cfg);
  cfg.palette_id = 1;
  for (int t = 0; t < 8; t++) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  _tile_loadd(4, a, 64);
  _tile_loadd(5, a, 64);
  _tile_loadd(6, b, 64);
  _tile_loadd(7, b, 64);
  double start = now();
  for (long i = 0; i < n; i++) {
    _tile_dpbusd(0, 4, 6);
    _tile_dpbusd(1, 4, 7);
    _tile_dpbusd(2, 5, 6);
    _tile_dpbusd(3, 5, 7);
  }
  double seconds = now() - start;
  _tile_stored(0, c, 64);
  _tile_release();
  /* GOP/s, then a checksum that keeps the chain live */
  printf("%.2f %d\n", n * 4 * 32768.0 / seconds / 1e9, c[0]);
  return 0;
}
