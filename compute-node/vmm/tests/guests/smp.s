# BSP: copies a real-mode trampoline to 0x8000, sends INIT + SIPI (vector 8)
# to APIC ID 1, waits for the AP to set byte 0x9000, prints "S1\n" if it did
# or "S0\n" after a timeout, then powers off. The AP prints "A\n".
.code32
start:
  movb $0, 0x9000
  mov $tramp, %esi
  add $0x100000, %esi
  mov $0x8000, %edi
  mov $(tramp_end - tramp), %ecx
  rep movsb
  movl $0x01000000, 0xfee00310
  movl $0x00004500, 0xfee00300
  movl $0x01000000, 0xfee00310
  movl $0x00004608, 0xfee00300
  mov $0x00200000, %ecx
wait:
  cmpb $1, 0x9000
  je up
  dec %ecx
  jnz wait
  mov $'0', %bl
  jmp report
up:
  mov $'1', %bl
report:
  mov $0x3f8, %dx
  mov $'S', %al
  out %al, %dx
  mov %bl, %al
  out %al, %dx
  mov $'\n', %al
  out %al, %dx
  mov $0x600, %dx
  mov $0x34, %al
  out %al, %dx
1: hlt
  jmp 1b
.code16
tramp:
  mov $0x3f8, %dx
  mov $'A', %al
  out %al, %dx
  mov $'\n', %al
  out %al, %dx
  movb $1, 0x9000
2: hlt
  jmp 2b
tramp_end:
