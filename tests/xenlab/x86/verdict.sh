#!/bin/bash
# The verdict of one daemon scenario's boot, from its timestamped serial log (boot.py's), usable on
# a kept log: one "XENLAB-X86-VERDICT <scenario> <check> ok|FAIL" line per check, then PASS or
# "FAIL (n)"; exit 1 when a check failed.
# usage: verdict.sh SCENARIO LOG      SCENARIO: pci-<pyblk|qsd>[-intx][-smp] (dom0-init.sh)
set -uo pipefail
S=$1; LOG=$2
[ -r "$LOG" ] || { echo "verdict.sh: cannot read the log $LOG" >&2; exit 2; }
case "$S" in pci-pyblk*|pci-qsd*) ;; *) echo "verdict.sh: no checks for scenario '$S' (pci-<pyblk|qsd>[-intx][-smp])" >&2; exit 2 ;; esac
fails=0
check() {  # name pattern (an extended regexp the serial log must match)
  if grep -qE "$2" "$LOG"; then r=ok; else r=FAIL; fails=$((fails + 1)); fi
  echo "XENLAB-X86-VERDICT $S $1 $r"
}
# the daemon's status after all of the guest's I/O (dom0-init.sh), spaces removed
ST='XENLAB-X86-STATUS-IO-END \{.*'
check domu-userspace 'DOMU-INIT'
check daemon-serving 'XENLAB-X86-T [0-9.]+ daemon serving'
check function-bound-virtio-pci 'DOMU-FN 00:04.0 driver=virtio-pci '
check virtio-blk-driver-ok 'DOMU-VIRTIO virtio[0-9]+ device=0x0002 .* status=0x0000000f .*driver=virtio_blk'
check domu-io 'DOMU-IO-OK '
check image-has-pattern 'XENLAB-X86-CHECK image-has-pattern ok'
# the slot check against QEMU's devices (QMP query-pci): 00:04 free, 00:06 (QEMU's e1000) refused
check qemu-slots-checked "XENLAB-X86-DAEMON .*QEMU's PCI functions \(00:00, 00:01, 00:02, 00:06\) leave slot\(s\) 00:04 free"
check qemu-slot-conflict-refused "XENLAB-X86-CONFLICT .*ERROR .*bdf=00:06.0\): slot 00:06 is QEMU's .*8086:100e"
check qemu-slot-conflict-exit-78 'XENLAB-X86-CONFLICT-RC 78 errors=1$'
case "$S" in
  pci-qsd*) check backend-qsd 'XENLAB-X86-QSD qemu-storage-daemon version'
            check data-path-shadow "$ST\"backend\":\"connected\",[^}]*\"data_path\":\"shadow\"" ;;
  *)        check data-path-xen-mmap "$ST\"backend\":\"connected\",[^}]*\"data_path\":\"xen-mmap\"" ;;
esac
case "$S" in
  *-intx*)  # Linux without MSI: the function's INTx line, asserted by the daemon (set_pci_intx_level)
    check no-msi-vectors 'DOMU-FN 00:04.0 driver=virtio-pci irq=[0-9]+ msi_irqs= enable='
    check guest-intx-interrupts 'DOMU-IRQ-KIND msi=0 intx=[1-9]'
    check daemon-intx "$ST\"irq\":\"intx\",.*\"interrupts\":[1-9]" ;;
  *)
    check msix-vectors 'DOMU-FN 00:04.0 .* msi_irqs=[0-9]'
    check guest-msix-interrupts 'DOMU-IRQ-KIND msi=[1-9][0-9]* intx=0'
    check daemon-msix "$ST\"irq\":\"msi-x\",.*\"interrupts\":[1-9]" ;;
esac
case "$S" in
  *-smp*)  # I/O pinned to each of 2 vCPUs, read back; the daemon served ioreqs of both vCPUs
    check domu-two-vcpus 'DOMU-NCPU 2$'
    check vcpu0-io 'DOMU-VCPU-IO cpu=0 ok=1 '
    check vcpu1-io 'DOMU-VCPU-IO cpu=1 ok=1 '
    check daemon-ioreqs-both-vcpus "$ST\"per_vcpu\":\[[1-9][0-9]*,[1-9][0-9]*\]" ;;
esac
check daemon-clean-exit 'XENLAB-X86-T [0-9.]+ daemon exit rc=0'
echo "XENLAB-X86-VERDICT $S $([ $fails = 0 ] && echo PASS || echo "FAIL ($fails)")"
[ $fails = 0 ]
