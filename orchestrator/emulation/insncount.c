/*
 * insncount: a QEMU TCG plugin (plugin API version 1, QEMU 7.2) that counts the guest
 * instructions executed between marker system calls, for instruction-counted latency
 * (orchestrator/emulation/icount.py, docs/emulation.md).
 *
 * The guest marks a region with lseek(-1, MARK_BASE + 0, SEEK_SET) (start) and
 * lseek(-1, MARK_BASE + 1, SEEK_SET) (stop): fd -1 fails with EBADF, so the call changes
 * nothing in the guest, and the plugin sees its number and arguments. Each start..stop
 * region's count is written, one decimal number a line, to the file named by `out=PATH`
 * when QEMU exits; a first line "total N" holds the whole process's count.
 *
 * Counting: every translated block adds its instruction count to one counter when it
 * starts (an inline add: no call per block). The add is not atomic, so only regions run by
 * one guest thread at a time are exact; the agent counts with onnxruntime on one thread.
 *
 * Only the functions used are declared here, with the signatures of QEMU 7.2's
 * include/qemu/qemu-plugin.h (the header is not packaged by Debian).
 */
#include <inttypes.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define EXPORT __attribute__((visibility("default")))
typedef uint64_t qemu_plugin_id_t;
typedef struct {
    const char *target_name;
    struct { int min; int cur; } version;
    bool system_emulation;
} qemu_info_t;
struct qemu_plugin_tb;
typedef void (*tb_trans_cb_t)(qemu_plugin_id_t id, struct qemu_plugin_tb *tb);
typedef void (*syscall_cb_t)(qemu_plugin_id_t id, unsigned int vcpu, int64_t num, uint64_t a1, uint64_t a2,
                             uint64_t a3, uint64_t a4, uint64_t a5, uint64_t a6, uint64_t a7, uint64_t a8);
typedef void (*udata_cb_t)(qemu_plugin_id_t id, void *userdata);
enum qemu_plugin_op { QEMU_PLUGIN_INLINE_ADD_U64 };

void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t id, tb_trans_cb_t cb);
void qemu_plugin_register_vcpu_tb_exec_inline(struct qemu_plugin_tb *tb, enum qemu_plugin_op op, void *ptr,
                                              uint64_t imm);
size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *tb);
void qemu_plugin_register_vcpu_syscall_cb(qemu_plugin_id_t id, syscall_cb_t cb);
void qemu_plugin_register_atexit_cb(qemu_plugin_id_t id, udata_cb_t cb, void *userdata);
void qemu_plugin_outs(const char *string);

EXPORT int qemu_plugin_version = 1;

#define SYS_LSEEK_AARCH64 62
#define SYS_LSEEK_X86_64 8   /* the x86-64 twin of this host (orchestrator/emulation/twin.py) */
#define MARK_BASE UINT64_C(0x1c0a7000)
#define MAX_REGIONS 100000

static uint64_t insns;           /* every instruction the guest executed so far */
static uint64_t started;         /* `insns` at the last start marker */
static bool open_region;
static uint64_t regions[MAX_REGIONS];
static size_t n_regions;
static char out_path[4096];
static int64_t sys_lseek = SYS_LSEEK_AARCH64;  /* the guest's lseek number, set from the target at install */

static void on_tb_translate(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &insns, qemu_plugin_tb_n_insns(tb));
}

static void on_syscall(qemu_plugin_id_t id, unsigned int vcpu, int64_t num, uint64_t a1, uint64_t a2,
                       uint64_t a3, uint64_t a4, uint64_t a5, uint64_t a6, uint64_t a7, uint64_t a8)
{
    if (num != sys_lseek || (uint32_t)a1 != UINT32_MAX) {  /* fd -1: x86-64 passes it zero-extended */
        return;
    }
    if (a2 == MARK_BASE) {
        started = insns;
        open_region = true;
    } else if (a2 == MARK_BASE + 1 && open_region) {
        if (n_regions < MAX_REGIONS) {
            regions[n_regions++] = insns - started;
        }
        open_region = false;
    }
}

static void on_qemu_exit(qemu_plugin_id_t id, void *userdata)
{
    FILE *f = out_path[0] ? fopen(out_path, "w") : NULL;
    if (f == NULL) {
        qemu_plugin_outs("insncount: no out= file could be written\n");
        return;
    }
    fprintf(f, "total %" PRIu64 "\n", insns);
    for (size_t i = 0; i < n_regions; i++) {
        fprintf(f, "%" PRIu64 "\n", regions[i]);
    }
    fclose(f);
}

EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info, int argc, char **argv)
{
    for (int i = 0; i < argc; i++) {
        if (strncmp(argv[i], "out=", 4) == 0) {
            snprintf(out_path, sizeof out_path, "%s", argv[i] + 4);
        }
    }
    if (info != NULL && info->target_name != NULL && strcmp(info->target_name, "x86_64") == 0) {
        sys_lseek = SYS_LSEEK_X86_64;
    }
    qemu_plugin_register_vcpu_tb_trans_cb(id, on_tb_translate);
    qemu_plugin_register_vcpu_syscall_cb(id, on_syscall);
    qemu_plugin_register_atexit_cb(id, on_qemu_exit, NULL);
    return 0;
}
