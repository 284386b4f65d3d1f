#!/usr/bin/env python3
"""Reference decoder of timm_fslt tickets -- the specification an accelerator ports.

    python timm_fslt/reference_decoder.py TICKET_DIR --out weights.npz

Standard library and NumPy only (no torch, nothing else of timm_fslt).  For every
masked layer NAME of the ticket it writes, bit for bit what
``timm_fslt.materialize(timm_fslt.load_ticket(TICKET_DIR))`` holds:

    NAME.weight  W * mask * scale (float64/float32/float16 as the layer's dtype;
                 bfloat16 layers as float32 arrays holding the exact bfloat16 values)
    NAME.frozen  int8 code: -1 pruned, +1 locked, 0 free
    NAME.mask    bool supermask (locked, plus the free weights whose stored bit is 1)

(a masked tensor other than a layer's weight -- its row has "module" and "param", and NAME
is "module.param" -- is written as NAME itself, with NAME.frozen and NAME.mask), and for
every parameter the ticket regenerates (config "regenerated": constants, and tables drawn
from the seed) its value under its state-dict key, checked against the recorded digest.

The supermask: raw bits (config "mask" "coding" absent or "raw"), or (format 5, "coding":
"entropy") one record per layer, decoded by ``entropy_layer`` below (section 5b: the rANS decoder).

Format 6 (a search method's ticket) stores a symbol per free weight instead of a bit, of the
alphabet config "mask" "alphabet" names (raw: ceil(log2(alphabet))-bit fields; or entropy records of
that alphabet), and the step count "search_step" the ticket was saved at:

    multicoated   the symbol is the weight's level (coats holding it, 0..C; locked C, pruned 0);
                  NAME.weight = W * level * scale, and NAME.level (uint8) is written too
    iterand       0: left out; 1 + r: kept, drawn last in round r -- r >= 1 replaces the seed's
                  value by weight_init's on the stream "iterand/<r>" at that row-major position;
                  NAME.round (int32; 0 where nothing is stored) is written too
    a schedule    (sparsity_schedule, schedule_steps) the static scale's sparsity is the schedule's
                  at "search_step"
    every layer's NAME.weight is checked against its "masked_digest" (signed zeros as +0).

config.json: formats 1-3 hold the ticket's record at the top; format 4 holds timm's Hub keys
(architecture, model_args, pretrained_cfg, ...) at the top and the record under "timm_fslt", whose
"integrity" sha256 covers the whole document but itself.  Every file the record's "files" lists
(a format-4 ticket may list timm's model.safetensors) is checked against its size and sha256.

Not covered: compacted tickets (config "structure"; their layers were cut by
torch-pruning) and generator version 1 with kaiming_normal weights (version 1's
normal used torch's float64 sqrt, whose last bit differs between CPUs).  Anything
it cannot decode exactly exits with status 2 and ONE line naming the file and the
problem; the output is written to a temporary file and renamed, so an error
leaves nothing behind.
"""
import os
import sys

# Run as a script, Python puts this file's directory first on sys.path: drop it, so the
# package's own modules next to this file can never shadow a standard-library module.
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]

import argparse  # noqa: E402
import bisect  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import struct  # noqa: E402
import tempfile  # noqa: E402

import numpy as np  # noqa: E402

FORMAT = "timm_fslt.ticket"
FORMAT_VERSIONS = (1, 2, 3, 4, 5, 6)
OWN_KEY = "timm_fslt"  # format 4: timm's keys at the top of config.json, the ticket's record under this key
GENERATOR_VERSIONS = (1, 2)
DTYPES = ("float64", "float32", "bfloat16", "float16")
M32 = 0xFFFFFFFF


class DecodeError(Exception):
    """One line: the file and what is wrong with it."""


# -- 1. the counter-based hash ----------------------------------------------------------
def stream_key(seed, name, stream):
    """k0, k1, k2: the first three little-endian 32-bit words of sha256("seed/name/stream")."""
    return struct.unpack("<3I", hashlib.sha256(f"{seed}/{name}/{stream}".encode("utf-8")).digest()[:12])


def mix(x):
    """lowbias32 on uint64 arrays holding 32-bit values (products wrap mod 2**64; & keeps 32 bits)."""
    x = x ^ (x >> np.uint64(16))
    x = (x * np.uint64(0x7FEB352D)) & np.uint64(M32)
    x = x ^ (x >> np.uint64(15))
    x = (x * np.uint64(0x846CA68B)) & np.uint64(M32)
    return x ^ (x >> np.uint64(16))


def hashes(seed, name, stream, n, positions=None):
    """h(i) for the row-major element indices i = 0 .. n-1, or i in ``positions`` (uint64 holding 32 bits)."""
    k0, k1, k2 = (np.uint64(k) for k in stream_key(seed, name, stream))
    i = np.arange(n, dtype=np.uint64) if positions is None else np.asarray(positions, dtype=np.uint64)
    x = mix((i & np.uint64(M32)) ^ k0)
    x = mix(x ^ (i >> np.uint64(32)) ^ k1)
    return mix((x + k2) & np.uint64(M32))


# -- 2. the normal: a fixed-point inverse CDF (generator version 2) -----------------------
# Row k * 8 + j holds C0..C6 of octave k = clz32(t), part j (the 3 bits after t's leading
# one); Horner over the remaining 28 bits y gives Z = |z| * 2**38 (max error 1.24e-11 measured).
SEG_BITS, Y, FRAC = 3, 28, 38
NORMAL_TABLE = (  # row k * 8 + j: C0 .. C6 of octave k, part j
    (185402330788, -27031365150, 896480826, -83204380, 7011840, -666438, 49120),
    (159190636604, -25463006779, 683009800, -60841476, 4393687, -380422, 25437),
    (134353836851, -24263686361, 523424184, -46563277, 2862194, -231569, 14002),
    (110569656024, -23346152887, 398801523, -37150652, 1908703, -149323, 8048),
    (87586921436, -22653065313, 297429093, -30848354, 1279655, -101910, 4728),
    (65201619335, -22146114754, 211613669, -26654403, 839135, -73993, 2737),
    (43241231726, -21799847632, 135986316, -23983125, 508980, -57801, 1427),
    (21553839890, -21598068900, 66534159, -22496705, 240448, -49336, 443),
    (316205629932, -20864190576, 910882968, -73051618, 6517458, -609763, 45367),
    (296185223767, -19238286296, 725414511, -52174351, 4128185, -345608, 23550),
    (277623983757, -17929054340, 590557146, -38647681, 2743358, -207794, 13059),
    (260249387505, -16853870283, 489191886, -29491480, 1895104, -131079, 7642),
    (243856989296, -15956990076, 410891754, -23069236, 1351527, -86046, 4678),
    (228289091895, -15199410336, 349002814, -18430162, 989843, -58417, 2974),
    (213421188610, -14553010067, 299111765, -14995554, 741396, -40818, 1953),
    (199152997285, -13996999988, 258194556, -12399135, 565995, -29243, 1318),
    (421695844231, -17461495731, 850848248, -67018061, 6028274, -565327, 42143),
    (405023683776, -15939314122, 680941439, -47717496, 3814284, -319965, 21849),
    (389721109763, -14706795341, 557802185, -35223956, 2532866, -192116, 12102),
    (375539245503, -13687619349, 465587600, -26772045, 1749022, -121027, 7075),
    (362292076780, -12830326879, 394661306, -20844936, 1247402, -79339, 4327),
    (349836738661, -12098920202, 338882335, -16562298, 914109, -53784, 2748),
    (338061001570, -11467438418, 294183432, -13388795, 685521, -37519, 1804),
    (326875007595, -10916672627, 257782008, -10985862, 524428, -26827, 1217),
    (512023836914, -15256003760, 788608861, -62180339, 5617364, -528170, 39438),
    (497499390308, -13845261843, 631080823, -44205817, 3549808, -298577, 20423),
    (484244275126, -12702888767, 517082294, -32584742, 2354550, -179076, 11301),
    (472028070685, -11757887786, 431833853, -24731694, 1624198, -112697, 6600),
    (460678803160, -10962442252, 366355855, -19230064, 1157278, -73808, 4033),
    (450064574202, -10283136468, 314931657, -15258487, 847330, -49990, 2560),
    (440081910803, -9695893889, 273778619, -12317936, 634938, -34843, 1678),
    (430648079372, -9182914848, 240311161, -10093075, 485384, -24894, 1132),
    (592052567723, -13688129918, 734071561, -58142131, 5270978, -496737, 37143),
    (579045178618, -12375590122, 586859804, -41284603, 3327213, -280517, 19217),
    (567218229610, -11313702765, 480451871, -30397399, 2204657, -168084, 10623),
    (556356628514, -10435949273, 400965883, -23047522, 1519371, -105686, 6200),
    (546300017487, -9697573825, 339975540, -17903097, 1081639, -69160, 3785),
    (536925532369, -9067328569, 292121184, -14192538, 791302, -46805, 2401),
    (528136879343, -8522718232, 253859289, -11447430, 592500, -32599, 1573),
    (519857134443, -8047125504, 222769572, -9371996, 452614, -23275, 1060),
    (664533562296, -12504512096, 687607032, -54722856, 4975815, -469842, 35175),
    (652666475523, -11275701520, 549121597, -38816305, 3137895, -265093, 18183),
    (641903970280, -10282572035, 449121412, -28552763, 2077390, -158713, 10044),
    (632043895616, -9462411242, 374490766, -21629804, 1430500, -99718, 5858),
    (622935681976, -8773060568, 317274912, -16788012, 1017603, -65208, 3574),
    (614464064276, -8185108969, 272417943, -13298304, 743926, -44102, 2265),
    (606538777036, -7677399207, 236579506, -10718366, 556655, -30697, 1484),
    (599087766410, -7234313258, 207479591, -8769079, 424964, -21904, 999),
    (731193778103, -11572435687, 647995399, -51793654, 4721470, -446573, 33467),
    (720221852525, -10414972050, 516978624, -36705858, 2975063, -251773, 17288),
    (710289893817, -9480387271, 422452582, -26978308, 1968111, -150633, 9544),
    (701206807841, -8709240494, 351962929, -20421659, 1354309, -94580, 5562),
    (692830373909, -8061601906, 297961315, -15839152, 962779, -61811, 3392),
    (685051798525, -7509634323, 255653227, -12538405, 703419, -41781, 2149),
    (677785942812, -7033325417, 221872912, -10099610, 526043, -29066, 1407),
    (670964889081, -6617911140, 194460756, -8257994, 401377, -20729, 947),
    (793197284932, -10815105464, 613949451, -49256591, 4499970, -426234, 31971),
    (782950978034, -9718915816, 489395851, -34881254, 2833503, -240150, 16505),
    (773689186674, -8834535587, 399598777, -25619331, 1873257, -143592, 9107),
    (765230369305, -8105366322, 332680791, -19380421, 1288270, -90110, 5305),
    (757439506817, -7493411647, 281447505, -15022507, 915323, -58859, 3233),
    (750213379864, -6972197763, 241331764, -11885228, 668400, -39766, 2047),
    (743471259319, -6522702863, 209319494, -9568388, 499610, -27652, 1340),
    (737148780861, -6130900819, 183355543, -7819701, 381031, -19712, 902),
    (851370841457, -10184735480, 584397238, -47036722, 4305196, -408290, 30649),
    (841727394048, -9141687957, 465494246, -33287420, 2709219, -229910, 15814),
    (833020408040, -8300779518, 379825022, -24434025, 1790099, -137398, 8721),
    (825076680940, -7607905823, 316020168, -18473506, 1230449, -86181, 5078),
    (817767471125, -7026764648, 267196591, -14312121, 873824, -56268, 3094),
    (810994411597, -6532075310, 228986836, -11317714, 637811, -37999, 1958),
    (804680607178, -6105681787, 198509899, -9107347, 476544, -26413, 1281),
    (798764779356, -5734202232, 173802184, -7439709, 363295, -18822, 862),
    (906325605653, -9649894718, 558494978, -45076375, 4132424, -392325, 29470),
    (897192899107, -8653389011, 444578392, -31882031, 2599130, -220811, 15199),
    (888954599974, -7850494669, 362546569, -23390290, 1716533, -131902, 8378),
    (881444854593, -7189315510, 301481359, -17675912, 1179359, -82699, 4876),
    (874540446067, -6635047331, 254775825, -13688091, 837196, -53974, 2970),
    (868147272661, -6163463222, 218239476, -10819728, 610839, -36437, 1879),
    (862191805468, -5757171007, 189109110, -8703200, 456226, -25318, 1229),
    (856615472509, -5403356699, 165502097, -7106926, 347686, -18036, 826),
    (958527877434, -9188983875, 535586469, -43330786, 3977965, -378014, 28412),
    (949834777605, -8233611051, 426107156, -30632288, 2500835, -212666, 14647),
    (941998944239, -7464265713, 347307986, -22463283, 1650924, -126986, 8071),
    (934861055237, -6831022403, 288674696, -16968317, 1133843, -79588, 4696),
    (928302798163, -6300412358, 243847257, -13135053, 804595, -51925, 2859),
    (922233853537, -5849147097, 208793240, -10378824, 586856, -35043, 1808),
    (916583674477, -5460514031, 180854564, -8345704, 438175, -24342, 1182),
    (911296084320, -5122203935, 158220789, -6812809, 333829, -17336, 795),
    (1008342675875, -8786623750, 515159929, -41764842, 3838910, -365100, 27455),
    (1000032948477, -7867903563, 409658934, -29512509, 2412441, -205322, 14149),
    (992547412606, -7128415181, 333754711, -21633589, 1591984, -122559, 7794),
    (985732595767, -6520004622, 277296989, -16335640, 1092992, -76789, 4534),
    (979474573231, -6010402340, 234148037, -12641031, 775363, -50084, 2759),
    (973686405934, -5577161775, 200417609, -9985312, 565367, -33791, 1745),
    (968300209777, -5204179510, 173542106, -8026896, 422014, -23466, 1140),
    (963261945165, -4879598421, 151775921, -6550722, 321433, -16708, 767),
    (1056061865454, -8431537841, 496812841, -40350691, 3712935, -353376, 26585),
    (1048090175908, -7545719874, 394902670, -28502363, 2332444, -198662, 13697),
    (1040913003819, -6833002984, 321608726, -20885862, 1538693, -118547, 7543),
    (1034382151388, -6246835829, 267110790, -15765980, 1056088, -74254, 4386),
    (1028387646589, -5756032794, 225472528, -12196587, 748974, -48418, 2669),
    (1022845592961, -5338907680, 192932409, -9631568, 545984, -32659, 1687),
    (1017690501135, -4979906800, 167012298, -7740514, 407446, -22675, 1102),
    (1012870251992, -4667580724, 146025197, -6315455, 310266, -16141, 741),
    (1101923020099, -8115251231, 480225323, -39065993, 3598168, -342675, 25791),
    (1094252209482, -7259164536, 381575757, -27585575, 2259631, -192589, 13283),
    (1087349115454, -6570614471, 310649848, -20207836, 1490227, -114891, 7313),
    (1081070325644, -6004507955, 257928317, -15249840, 1022550, -71946, 4252),
    (1075309451022, -5530644862, 217658319, -11794199, 725011, -46902, 2586),
    (1069985350975, -5128029772, 186195506, -9311520, 528393, -31629, 1635),
    (1065034703587, -4781608088, 161139501, -7481582, 394233, -21956, 1068),
    (1060407126763, -4480300270, 140856597, -6102869, 300143, -15626, 718),
    (1146122488460, -7831259040, 465140414, -37892636, 3493080, -332859, 25061),
    (1138721662479, -7002197744, 369467623, -26748969, 2193013, -187022, 12904),
    (1132064202284, -6335595044, 300701813, -19589600, 1445918, -111543, 7103),
    (1126011060930, -5787691648, 249599468, -14779556, 991911, -69834, 4129),
    (1120459115399, -5329188138, 210575763, -11427809, 703131, -45516, 2511),
    (1115329735342, -4939720026, 180093582, -9020287, 512342, -30688, 1587),
    (1110561571852, -4604688275, 155823664, -7246100, 382184, -21299, 1036),
    (1106105823063, -4313350786, 136181009, -5909643, 290917, -15156, 697),
    (1188824693644, -7574476932, 451349506, -36815788, 3396414, -323816, 24388),
    (1181667847417, -6770112390, 358407621, -25981778, 2131780, -181897, 12555),
    (1175232123307, -6123549524, 291622004, -19023065, 1405218, -108462, 6909),
    (1169382476387, -5592254698, 242002970, -14348883, 963784, -67891, 4015),
    (1164018775684, -5147755638, 204120252, -11092482, 683058, -44241, 2442),
    (1159064689075, -4770266904, 174535317, -8753895, 497623, -29824, 1543),
    (1154460672935, -4445607323, 150984249, -7030818, 371140, -20695, 1008),
    (1150159370495, -4163344151, 131926778, -5733080, 282464, -14724, 677),
    (1230168910256, -7340867443, 438681550, -35823186, 3307127, -315452, 23765),
    (1223233916616, -6559180076, 348256060, -25275111, 2075258, -177160, 12232),
    (1216999627819, -5931004669, 283293848, -18501561, 1367673, -105616, 6730),
    (1211334684223, -5414938669, 235039830, -13952677, 937852, -66098, 3910),
    (1206141708371, -4983272661, 198206503, -10784161, 664561, -43065, 2378),
    (1201346481926, -4616754955, 169446349, -8509083, 484067, -29026, 1502),
    (1196891120780, -4301589356, 146555743, -6833070, 360973, -20139, 981),
    (1192729595913, -4027627996, 128035679, -5570970, 274686, -14326, 659),
    (1270274305197, -7127179440, 426994968, -34904606, 3224342, -307687, 23186),
    (1263542155960, -6366405282, 338897495, -24621565, 2022885, -172764, 11932),
    (1257491888660, -5755175682, 275621143, -18019543, 1332903, -102977, 6564),
    (1251995551067, -5253135922, 228628459, -13586668, 913850, -64435, 3813),
    (1246958310163, -4833282910, 192764311, -10499480, 647448, -41976, 2318),
    (1242307899875, -4476858907, 164765525, -8283146, 471531, -28288, 1464),
    (1237987968055, -4170423824, 142484332, -6650648, 351575, -19624, 956),
    (1233953710822, -3904093187, 124459923, -5421485, 267499, -13958, 642),
    (1309243755071, -6930762436, 416171555, -34051449, 3147321, -300454, 22647),
    (1302697982255, -6189350789, 330235680, -24014925, 1974186, -168672, 11652),
    (1296816669387, -5593800914, 268523786, -17572361, 1300588, -100522, 6409),
    (1291475026374, -5104732227, 222701002, -13247277, 891552, -62889, 3723),
    (1286580580257, -4695797956, 187735351, -10235623, 631558, -40963, 2263),
    (1282062874887, -4348699128, 160442098, -8073824, 459895, -27602, 1429),
    (1277866977756, -4050326256, 138725392, -6481708, 342856, -19145, 933),
    (1273949219828, -3791039302, 121159926, -5283099, 260834, -13616, 627),
    (1347166783492, -6749431667, 406111821, -33256433, 3075436, -293696, 22143),
    (1340793011095, -6026011216, 322189710, -23449932, 1928758, -164851, 11391),
    (1335067514955, -5445022475, 261934526, -17156082, 1270459, -98229, 6264),
    (1329868449417, -4967993399, 217200554, -12931483, 870772, -61447, 3638),
    (1325105538053, -4569189058, 183070762, -9990213, 616754, -40018, 2211),
    (1320710008491, -4230737981, 156433590, -7879212, 449059, -26962, 1396),
    (1316628248383, -3939838630, 135241611, -6324697, 334738, -18699, 911),
    (1312817643618, -3687078573, 118102611, -5154528, 254630, -13298, 612),
    (1384121853499, -6581368339, 396731400, -32513347, 3008150, -287364, 21670),
    (1377907445668, -5874719794, 314691069, -22922107, 1886256, -161272, 11146),
    (1372326230967, -5307298441, 255796471, -16767364, 1242282, -96083, 6129),
    (1367259113960, -4841482110, 212079024, -12636718, 851346, -60097, 3559),
    (1362617868964, -4452107964, 178729285, -9761232, 602920, -39134, 2163),
    (1358335295002, -4121704103, 152704168, -7697693, 438936, -26363, 1366),
    (1354359011313, -3837756721, 132001536, -6178297, 327157, -18283, 891),
    (1350647387597, -3591065976, 115260118, -5034684, 248838, -13000, 599),
    (1420178179613, -6425044729, 387958257, -31816858, 2945000, -281416, 21225),
    (1414111961093, -5734078530, 307681316, -22427606, 1846385, -157912, 10916),
    (1408664835661, -5179337247, 250061147, -16403339, 1215859, -94069, 6002),
    (1403720284014, -4723995872, 207295474, -12360783, 833135, -58830, 3485),
    (1399192000624, -4343427973, 174675834, -9546954, 589957, -38305, 2117),
    (1395014255299, -4020536162, 149223381, -7527884, 429453, -25802, 1337),
    (1391135819623, -3743076228, 128978457, -6041384, 320058, -17892, 873),
    (1387515983507, -3502047458, 112608807, -4922638, 243416, -12721, 586),
    (1455397176732, -6279167144, 379730488, -31162360, 2885584, -275815, 20806),
    (1449469208292, -5602905159, 301110287, -21963116, 1808886, -154749, 10699),
    (1444147115139, -5060047944, 244686983, -16061537, 1191018, -92174, 5882),
    (1439316797367, -4614520099, 202814828, -12101784, 816021, -57638, 3415),
    (1434893752109, -4242199415, 170880366, -9345893, 577777, -37525, 2075),
    (1430813629494, -3926340431, 145965177, -7368598, 420547, -25275, 1310),
    (1427026282224, -3654952198, 126149541, -5912990, 313391, -17524, 855),
    (1423491863299, -3419221015, 110128480, -4817591, 238325, -12459, 574),
    (1489833630793, -6142631945, 371994581, -30545854, 2829554, -270529, 20411),
    (1484035027010, -5480192319, 294934656, -21525760, 1773537, -151765, 10495),
    (1478829875854, -4948501998, 239638107, -15739816, 1167610, -90387, 5769),
    (1474106355138, -4512192118, 198606844, -11858081, 799899, -56515, 3349),
    (1469781658515, -4147615562, 167317003, -9156763, 566307, -36790, 2035),
    (1465792734744, -3838358363, 142907127, -7218804, 412161, -24778, 1284),
    (1462090453371, -3572668062, 123495143, -5792280, 307116, -17178, 838),
    (1458635778947, -3341907016, 107801771, -4718855, 233535, -12212, 563),
    (1523536653649, -6014491227, 364704019, -29963847, 2776604, -265531, 20037),
    (1517859433703, -5365075757, 289116799, -21113029, 1740144, -148943, 10301),
    (1512763963218, -4843903587, 234883395, -15436310, 1145502, -88697, 5662),
    (1508140569182, -4416273236, 194645299, -11628245, 784677, -55453, 3287),
    (1503908045510, -4058986214, 163963318, -8978444, 555480, -36096, 1996),
    (1500004565551, -3755941492, 140029811, -7077610, 404247, -24308, 1260),
    (1496381957459, -3495611692, 120998261, -5678527, 301196, -16852, 822),
    (1493001950668, -3269525292, 105613658, -4625831, 229016, -11979, 552),
    (1556550468744, -5893925769, 357818162, -29413278, 2726465, -260794, 19682),
    (1550987433211, -5256809307, 283623871, -20722724, 1708533, -146271, 10118),
    (1545995097430, -4745566260, 230395695, -15149383, 1124582, -87098, 5560),
    (1541465820526, -4326126820, 190907336, -11411025, 770276, -54449, 3227),
    (1537319909073, -3975716996, 160799776, -8809957, 545240, -35439, 1960),
    (1533496693658, -3678531788, 137316320, -6944233, 396764, -23864, 1238),
    (1529948908093, -3423256687, 118644103, -5571096, 295599, -16543, 807),
    (1526639004277, -3201577242, 103551080, -4537995, 224745, -11758, 542),
    (1588915062729, -5780223489, 351301329, -28891448, 2678900, -256298, 19346),
    (1583459691068, -5154745002, 278427059, -20352910, 1678554, -143735, 9944),
    (1578564564977, -4652894416, 226151206, -14877598, 1104747, -85580, 5464),
    (1574123968801, -4241200925, 187372932, -11205321, 756626, -53495, 3171),
    (1570059641789, -3897292970, 157809273, -8650441, 535536, -34816, 1926),
    (1566312010298, -3605646126, 134751859, -6817986, 389674, -23443, 1216),
    (1562834665492, -3355147589, 116419732, -5469429, 290297, -16249, 793),
    (1559590743046, -3137631713, 101602616, -4454888, 220700, -11549, 532),
    (1620666729901, -5672762148, 345122056, -28395968, 2633698, -252022, 19025),
    (1615313094541, -5058317120, 273500972, -20001874, 1650073, -141324, 9778),
    (1610509795046, -4565368462, 222128970, -14619682, 1085908, -84138, 5373),
    (1606152943015, -4161014390, 184024463, -11010163, 743664, -52590, 3118),
    (1602165637118, -3823265536, 154976768, -8499137, 526323, -34225, 1894),
    (1598489343205, -3536863877, 132323421, -6698263, 382945, -23043, 1195),
    (1595078465583, -3290888088, 114313778, -5373035, 285266, -15971, 780),
    (1591896788313, -3077313751, 99758238, -4376106, 216862, -11351, 523),
    (1651838530179, -5570995329, 339252479, -27924717, 2590672, -247950, 18720),
    (1646581224053, -4967029277, 268823142, -19668096, 1622970, -139029, 9620),
    (1641864843384, -4482532826, 218310450, -14374508, 1067984, -82764, 5286),
    (1637587237005, -4085145622, 180846353, -10824688, 731336, -51728, 3067),
    (1633672795723, -3753241874, 152288968, -8355371, 517562, -33661, 1863),
    (1630063973211, -3471816929, 130019523, -6584527, 376547, -22662, 1176),
    (1626715946337, -3230131537, 112316210, -5281478, 280483, -15707, 767),
    (1623593115075, -3020295550, 98009099, -4301290, 213215, -11162, 515),
    (1682460676802, -5474441002, 333667825, -27475803, 2549655, -244066, 18429),
    (1677294751839, -4880443911, 264373605, -19350222, 1597139, -136840, 9470),
    (1672660801080, -4403986193, 214679186, -14141071, 1050906, -81455, 5203),
    (1668458327656, -4013223471, 177824778, -10648131, 719591, -50906, 3019),
    (1664612952536, -3686876362, 149734087, -8218544, 509218, -33125, 1833),
    (1661068069644, -3410181570, 127829980, -6476301, 370453, -22300, 1157),
    (1657779591064, -3172573256, 110418135, -5194371, 275929, -15454, 755),
    (1654712502801, -2966289126, 96347360, -4230121, 209742, -10982, 506),
    (1712560866447, -5382672118, 328345989, -27047532, 2510496, -240357, 18150),
    (1707481781074, -4798173644, 260134560, -19047040, 1572485, -134750, 9326),
    (1702926142011, -4329373501, 211220509, -13918473, 1034609, -80206, 5124),
    (1698795030074, -3944919753, 174947424, -10479805, 708385, -50122, 2973),
    (1695015239176, -3623863553, 147301627, -8088120, 501258, -32612, 1805),
    (1691531059580, -3351671860, 125745730, -6373157, 364642, -21954, 1139),
    (1688299104120, -3117944236, 108611641, -5111368, 271587, -15214, 743),
    (1685284917273, -2915040323, 94766049, -4162316, 206431, -10811, 499),
    (1742164561871, -5295308831, 323267177, -26638386, 2473061, -236809, 17884),
    (1737168135968, -4719874137, 256090072, -18757463, 1548921, -132751, 9189),
    (1732687019798, -4258379326, 207921296, -13705908, 1019036, -79011, 5048),
    (1728623800934, -3879943081, 172203281, -10319098, 697679, -49372, 2929),
    (1724906393271, -3563932385, 144982207, -7963621, 493654, -32123, 1778),
    (1721479942781, -3296034164, 123758678, -6274715, 359092, -21623, 1122),
    (1718301731172, -3066005967, 106889666, -5032160, 267440, -14984, 732),
    (1715337835897, -2866323888, 93258946, -4097621, 203269, -10647, 491),
)


def normal_fixed(h):
    """+-Z (int64) for 32-bit hashes h: sign = bit 31 (1: negative), t = 2 (h mod 2**31) + 1."""
    h = h.astype(np.int64)
    t = 2 * (h & 0x7FFFFFFF) + 1  # odd, in [1, 2**32): the tail probability is t / 2**33
    k = np.zeros_like(t)
    for b in (16, 8, 4, 2, 1):  # k = clz32(t); t << k has its leading one at bit 31
        shift = np.where(t < (1 << (32 - b)), b, 0).astype(np.int64)
        t = t << shift
        k = k + shift
    seg = k * 8 + ((t >> Y) & 7)
    y = t & ((1 << Y) - 1)
    table = np.array(NORMAL_TABLE, dtype=np.int64)
    acc = table[seg, 6]
    for i in range(5, -1, -1):  # acc = C_i + round(acc * y / 2**28); |acc * y| < 2**63
        acc = table[seg, i] + ((acc * y + (1 << (Y - 1))) >> Y)
    return np.where((h >> 31) == 1, -acc, acc)


# -- 3. weights: an exact integer times ONE float64 constant, then rounded ----------------
def round_to(values64, dtype):
    """float64 -> the layer dtype: round-to-nearest-even to float32, then to bfloat16/float16."""
    if dtype == "float64":
        return values64
    f32 = values64.astype(np.float32)
    if dtype == "float32":
        return f32
    if dtype == "float16":
        return f32.astype(np.float16)
    return bf16_round(f32)


def bf16_round(f32):
    """float32 -> bfloat16 (round to nearest, ties to even), kept as float32 (finite values)."""
    bits = f32.view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
    return bits.astype(np.uint32).view(np.float32)


def random_weight(kind, seed, name, shape, dtype, generator_version, stream="weight", positions=None):
    """The layer's weight (stream "weight"), or with ``positions`` (row-major) only those elements,
    1-D (IteRand's round r draws on the stream "iterand/<r>" by the same rule)."""
    n = math.prod(shape)
    fan_in = shape[1] * math.prod(shape[2:]) if len(shape) >= 2 else max(shape[0], 1) if shape else 1
    std = math.sqrt(2.0) / math.sqrt(fan_in)  # Python floats: IEEE, correctly rounded
    h = hashes(seed, name, stream, n, positions)
    if kind == "kaiming_uniform":  # (2h + 1 - 2**32) * (bound * 2**-32), bound = std * sqrt(3)
        integer, factor = 2 * h.astype(np.int64) + 1 - (1 << 32), std * math.sqrt(3.0) * 2.0 ** -32
    elif kind == "signed_kaiming_constant":  # bit 31 of h: 1 -> +std, 0 -> -std
        integer, factor = 2 * (h >> np.uint64(31)).astype(np.int64) - 1, std
    elif kind == "kaiming_normal" and generator_version == 2:
        integer, factor = normal_fixed(h), std * 2.0 ** -FRAC
    else:
        raise DecodeError(f"weight_init {kind!r} with generator version {generator_version} is not decodable "
                          "(version 1's normal depends on the CPU's float64 sqrt)")
    values = round_to(integer.astype(np.float64) * factor, dtype)
    return values if positions is not None else values.reshape(shape)


# -- 4. the freezing pattern ----------------------------------------------------------------
def frozen_code(seed, name, shape, n_pruned, n_locked, keys=None):
    """Rank positions by key = h * 2**32 + i ("freeze" stream): the first n_pruned are pruned
    (-1), the next n_locked locked (+1).  With the ticket's freeze_keys [t1, t2] that is
    elementwise: key < t1 pruned, t1 <= key < t2 locked, else free."""
    n = math.prod(shape)
    key = (hashes(seed, name, "freeze", n) << np.uint64(32)) | np.arange(n, dtype=np.uint64)
    code = np.zeros(n, dtype=np.int8)
    if keys is not None:
        t1, t2 = (np.uint64(t) for t in keys)
        code[key < t2] = 1
        code[key < t1] = -1
    else:
        order = np.argsort(key, kind="stable")
        code[order[n_pruned:n_pruned + n_locked]] = 1
        code[order[:n_pruned]] = -1
    return code.reshape(shape)


# -- 5. the ticket files ----------------------------------------------------------------------
def read_verified(directory, name, record):
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        raise DecodeError(f"{path}: missing")
    with open(path, "rb") as f:
        data = f.read()
    if not isinstance(record, dict) or len(data) != record.get("bytes") or \
            hashlib.sha256(data).hexdigest() != record.get("sha256"):
        raise DecodeError(f"{path}: size or sha256 checksum differs from config.json (tampered or truncated)")
    return data


def safetensors_u8(data, tensor, path):
    """The bytes of a 1-D uint8 tensor: 8-byte little-endian header length, JSON header, data."""
    (length,) = struct.unpack("<Q", data[:8])
    info = json.loads(data[8:8 + length]).get(tensor)
    if not info or info.get("dtype") != "U8" or len(info.get("shape", ())) != 1:
        raise DecodeError(f"{path}: no 1-D uint8 tensor {tensor!r}")
    begin, end = info["data_offsets"]
    return np.frombuffer(data[8 + length + begin:8 + length + end], dtype=np.uint8)


# -- 5b. the entropy-coded supermask (format 5) -------------------------------------------------
RANS_PRECISION = 24
RANS_LOW = 1 << 32


def rans_symbols(words, freqs, n, where):
    """n symbol indices from rANS words (32-bit words, 64-bit state, 24-bit precision).

    The state x starts as the last word, then x = x << 32 | the word before it (if there is one);
    a nonzero last word is required. Per symbol: q = x mod 2**24, s the index with
    cum[s] <= q < cum[s + 1], x = (x >> 24) * freqs[s] + q - cum[s], then if x < 2**32 and words
    remain, x = x << 32 | the next word (walking to the front). At the end every word must have
    been read and x must be 0 (the encoder's start)."""
    cum = [0]
    for f in freqs:
        cum.append(cum[-1] + f)
    pos = len(words)
    x = 0
    if pos:
        if words[pos - 1] == 0:
            raise DecodeError(f"{where}: rANS words end in a zero word")
        pos -= 1
        x = words[pos]
        if pos:
            pos -= 1
            x = (x << 32) | words[pos]
    mask = (1 << RANS_PRECISION) - 1
    out = np.empty(n, dtype=np.int64)
    for i in range(n):
        q = x & mask
        s = bisect.bisect_right(cum, q) - 1
        x = (x >> RANS_PRECISION) * freqs[s] + q - cum[s]
        if x < RANS_LOW and pos:
            pos -= 1
            x = (x << 32) | words[pos]
        out[i] = s
    if pos or x:
        raise DecodeError(f"{where}: rANS words do not end where the layer's symbols do")
    return out


def symbol_bits(alphabet):
    """b: bits of one raw symbol, ceil(log2(alphabet)), at least 1 (a mask bit)."""
    return max(1, (alphabet - 1).bit_length())


def unpack_symbols(raw, n, alphabet, where):
    """n b-bit fields: symbol i is bits [i*b, i*b + b) of the little-endian bit stream (bit j is bit
    j % 8 of byte j // 8), the padding bits 0, every symbol below the alphabet."""
    b = symbol_bits(alphabet)
    bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little")
    if len(raw) != (n * b + 7) // 8 or bits[n * b:].any():
        raise DecodeError(f"{where}: {len(raw)} bytes do not hold exactly {n} {b}-bit symbols (or nonzero padding)")
    fields = bits[:n * b].reshape(n, b).astype(np.int64)
    symbols = (fields << np.arange(b, dtype=np.int64)).sum(axis=1)
    if n and int(symbols.max()) >= alphabet:
        raise DecodeError(f"{where}: a raw symbol {int(symbols.max())} is not below the alphabet size {alphabet}")
    return symbols


def entropy_layer(data, at, n, where, alphabet=2):
    """(the n symbols -- mask bits for alphabet 2 -- of one layer record starting at byte ``at``,
    the byte after it).

    Method byte 0: ceil(n * b / 8) raw bytes (``unpack_symbols``; b = 1: bit i is bit i % 8 of byte
    i // 8); 1: a u16 symbol below the alphabet, every symbol equal to it (n >= 1); 2: u16 k
    (2 <= k <= min(alphabet, n)), k u16 symbols (increasing, below the alphabet), k u32 frequencies
    (>= 1, sum 2**24), u32 w, w u32 words (little-endian). A record never exceeds 1 + ceil(n * b / 8)
    bytes."""
    def take(size):
        nonlocal at
        if at + size > len(data):
            raise DecodeError(f"{where}: the record ends past the end of the file")
        chunk, at = data[at:at + size], at + size
        return chunk

    start, raw_len = at, (n * symbol_bits(alphabet) + 7) // 8
    method = take(1)[0]
    if method == 0:
        return unpack_symbols(take(raw_len), n, alphabet, where), at
    if method == 1:
        (symbol,) = struct.unpack("<H", take(2))
        if n < 1 or symbol >= alphabet:
            raise DecodeError(f"{where}: constant record of symbol {symbol} for {n} symbols (alphabet {alphabet})")
        return np.full(n, symbol, dtype=np.int64), at
    if method != 2:
        raise DecodeError(f"{where}: unknown record method {method}")
    (k,) = struct.unpack("<H", take(2))
    if not 2 <= k <= min(alphabet, n):
        raise DecodeError(f"{where}: {k} present symbols in a record of {n} symbols (alphabet {alphabet})")
    symbols = struct.unpack(f"<{k}H", take(2 * k))
    freqs = struct.unpack(f"<{k}I", take(4 * k))
    (w,) = struct.unpack("<I", take(4))
    if list(symbols) != sorted(set(symbols)) or symbols[-1] >= alphabet or min(freqs) < 1 \
            or sum(freqs) != 1 << RANS_PRECISION or at - start + 4 * w > 1 + raw_len:
        raise DecodeError(f"{where}: malformed rANS header (symbols {symbols}, frequencies {freqs}, {w} words)")
    words = struct.unpack(f"<{w}I", take(4 * w))
    index = rans_symbols(words, freqs, n, where)
    if len(set(index.tolist())) != k:
        raise DecodeError(f"{where}: a listed symbol never occurs")
    return np.array(symbols, dtype=np.int64)[index], at


def alphabet_of(config, path):
    """Symbols per free weight: 2 (mask bits) before format 6; format 6 records it (multicoated:
    coats + 1; IteRand: 2 + the highest stored round; Edge-Popup with a schedule: 2)."""
    if config["format_version"] < 6:
        return 2
    alphabet, freeze = config["mask"].get("alphabet"), config["freeze"]
    coats = len(freeze.get("coat_sparsities") or ()) if freeze.get("method") == "multicoated" else 1
    if not isinstance(alphabet, int) or isinstance(alphabet, bool) or not 2 <= alphabet <= 1 << 16 \
            or (coats > 1 and alphabet != coats + 1) or (freeze.get("method") != "iterand" and coats == 1
                                                        and alphabet != 2):
        raise DecodeError(f"{path}: alphabet {alphabet!r} does not fit method {freeze.get('method', 'edge_popup')!r}")
    return alphabet


def mask_symbols(config, payload, path):
    """Every layer's free-position symbols (mask bits before format 6), one concatenated int64
    array, in either coding; each layer's count of symbols >= 1 (its kept free weights) checked."""
    n_free = sum(row["free"] for row in config["layers"])
    coding, alphabet = config["mask"].get("coding", "raw"), alphabet_of(config, path)
    if coding == "raw":
        symbols = unpack_symbols(payload.tobytes(), n_free, alphabet, path)
        parts = np.split(symbols, np.cumsum([row["free"] for row in config["layers"]])[:-1])
    elif coding != "entropy" or config["format_version"] < 5:
        raise DecodeError(f"{path}: mask coding {coding!r} in format {config['format_version']}")
    else:
        data, at, parts = payload.tobytes(), 0, []
        for i, row in enumerate(config["layers"]):
            part, at = entropy_layer(data, at, row["free"], f"{path}: layer {i} ({row['name']})", alphabet)
            parts.append(part)
        if at != len(data):
            raise DecodeError(f"{path}: {len(data) - at} bytes follow the last layer's record")
    for i, (row, part) in enumerate(zip(config["layers"], parts)):
        if int((part >= 1).sum()) != row["kept"] - row["locked"]:
            raise DecodeError(f"{path}: layer {i} ({row['name']}) decodes to {int((part >= 1).sum())} kept free "
                              f"weights, config.json records {row['kept'] - row['locked']}")
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def mask_bits(config, payload, path):
    """Every layer's free-position mask bits (symbol >= 1), one concatenated bool array."""
    return mask_symbols(config, payload, path) >= 1


def read_config(directory):
    path = os.path.join(directory, "config.json")
    if not os.path.isdir(directory):
        raise DecodeError(f"{directory}: not a directory")
    try:
        with open(path, "rb") as f:
            config = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError) as err:
        raise DecodeError(f"{path}: unreadable ({type(err).__name__}: {err})") from None
    document = config
    nested = isinstance(document, dict) and isinstance(document.get(OWN_KEY), dict)
    if nested:
        config = document[OWN_KEY]
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise DecodeError(f"{path}: not a timm_fslt ticket config")
    if config.get("format_version") not in FORMAT_VERSIONS:
        raise DecodeError(f"{path}: unknown format_version {config.get('format_version')!r} "
                          f"(this decoder reads {list(FORMAT_VERSIONS)})")
    if config.get("generator_version") not in GENERATOR_VERSIONS:
        raise DecodeError(f"{path}: unknown generator_version {config.get('generator_version')!r} "
                          f"(this decoder regenerates {list(GENERATOR_VERSIONS)})")
    if nested != (config["format_version"] >= 4):
        raise DecodeError(f"{path}: format_version {config['format_version']} with its record "
                          f"{'under' if nested else 'not under'} {OWN_KEY!r}")
    integrity = config.get("integrity")
    if integrity is not None:  # sha256 of the canonical JSON of every other field
        body = {k: v for k, v in config.items() if k != "integrity"}
        if nested:  # format 4: of the whole document (timm's keys too) but the integrity record
            body = {**{k: v for k, v in document.items() if k != OWN_KEY}, OWN_KEY: body}
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                               allow_nan=False).encode("utf-8")
        if not isinstance(integrity, dict) or hashlib.sha256(canonical).hexdigest() != integrity.get("config_sha256"):
            raise DecodeError(f"{path}: its integrity sha256 does not match its content (edited)")
    if config.get("structure") is not None:
        raise DecodeError(f"{path}: a compacted ticket (\"structure\"); the reference decoder reads uncompacted ones")
    return config


# -- 6. the effective weight -------------------------------------------------------------------
def to_dtype(value, dtype):
    """A float32 scalar (the package's scale buffer) converted to the layer dtype."""
    v = np.array([value], dtype=np.float32)
    return {"float64": v.astype(np.float64), "float32": v, "float16": v.astype(np.float16),
            "bfloat16": bf16_round(v)}[dtype]


def multiply(a, b, dtype):
    """a * b rounded once to dtype (16-bit: the float32 product of two 16-bit values is exact)."""
    if dtype == "float16":
        return (a.astype(np.float32) * b.astype(np.float32)).astype(np.float16)
    if dtype == "bfloat16":
        return bf16_round(a * b)
    return a * b


def decode(directory):
    config = read_config(directory)
    files = config.get("files") if isinstance(config.get("files"), dict) else {}
    if "supermask.safetensors" not in files:
        raise DecodeError(f"{os.path.join(directory, 'config.json')}: no size and sha256 for supermask.safetensors")
    blobs = {name: read_verified(directory, name, record) for name, record in sorted(files.items())}
    packed = safetensors_u8(blobs["supermask.safetensors"], "supermask",
                            os.path.join(directory, "supermask.safetensors"))
    freeze, version = config["freeze"], config["generator_version"]
    symbols = mask_symbols(config, packed, os.path.join(directory, "supermask.safetensors"))
    method = freeze.get("method", "edge_popup") if config["format_version"] >= 6 else "edge_popup"
    coats = len(freeze["coat_sparsities"]) if method == "multicoated" else 1
    sparsity = scheduled_sparsity(freeze, config["mask"].get("search_step", 0))
    out, offset = {}, 0
    for row in config["layers"]:
        name, shape, dtype = row["name"], tuple(row["shape"]), row.get("dtype", "float32")
        if dtype not in DTYPES:
            raise DecodeError(f"{os.path.join(directory, 'config.json')}: layer {name!r} has dtype {dtype!r}")
        code = frozen_code(freeze["seed"], name, shape, row["pruned"], row["locked"], row.get("freeze_keys"))
        if int((code == -1).sum()) != row["pruned"] or int((code == 1).sum()) != row["locked"]:
            raise DecodeError(f"{os.path.join(directory, 'config.json')}: layer {name!r}: freeze_keys do not "
                              "give the recorded pruned/locked counts")
        mask = (code == 1).reshape(-1)
        free = np.flatnonzero(code.reshape(-1) == 0)  # free positions in row-major order
        sym = symbols[offset:offset + row["free"]]
        offset += row["free"]
        mask[free] = sym >= 1
        weight = random_weight(freeze["weight_init"], freeze["seed"], name, shape, dtype, version)
        extra = {}
        if method == "iterand":  # a kept weight of symbol 1 + r (r >= 1) holds round r's draw
            rounds = np.zeros(math.prod(shape), dtype=np.int32)
            rounds[free] = np.maximum(sym - 1, 0)
            flat = weight.reshape(-1).copy()
            for r in sorted(set(rounds.tolist()) - {0}):
                where = np.flatnonzero(rounds == r)
                flat[where] = random_weight(freeze["weight_init"], freeze["seed"], name, shape, dtype, version,
                                            stream=f"iterand/{r}", positions=where)
            weight, extra[f"{name}.round"] = flat.reshape(shape), rounds.reshape(shape)
        if method == "multicoated":  # the level: coats holding each weight (locked: all, pruned: none)
            level = np.where(code.reshape(-1) == 1, coats, 0).astype(np.uint8)
            level[free] = sym
            extra[f"{name}.level"] = level.reshape(shape)
            factor = level.reshape(shape)
        else:
            factor = mask.reshape(shape)
        mask = mask.reshape(shape)
        # the package: out = mask.to(dtype) * W (multicoated: the level), then out *= scale (in dtype)
        value = multiply(factor.astype(weight.dtype), weight, dtype)
        if freeze.get("scale") is not None:
            if freeze["scale"] == "static":
                scale = 1.0 / math.sqrt(max(1.0 - sparsity, 1e-12))
            else:  # "dynamic": the layer's own kept fraction
                scale = 1.0 / math.sqrt(max(int(mask.sum()) / max(math.prod(shape), 1), 1e-12))
            value = multiply(value, to_dtype(scale, dtype), dtype)  # scale: float32 first, as its buffer
        value_key = name if "param" in row else f"{name}.weight"
        out[value_key], out[f"{name}.frozen"], out[f"{name}.mask"] = value, code, mask
        out.update(extra)
        if config["format_version"] >= 6 and digest([(value + 0.0, dtype)]) != row.get("masked_digest"):
            raise DecodeError(f"{os.path.join(directory, 'config.json')}: layer {name!r}: the decoded weight "
                              "does not match its masked_digest (signed zeros as +0)")
    record = config.get("regenerated") or {"tensors": {}, "digest": None}
    names = sorted(record["tensors"])
    for key in names:
        out[key] = regenerated(freeze["seed"], key, record["tensors"][key], version, directory)
    if names and digest([(out[k], record["tensors"][k]["dtype"]) for k in names]) != record["digest"]:
        raise DecodeError(f"{os.path.join(directory, 'config.json')}: the regenerated parameters do not match "
                          "their recorded digest")
    return out


def scheduled_sparsity(freeze, step):
    """The sparsity after ``step`` optimizer steps (format 6 records the saved step count): the
    final one, or on a schedule (shape, start, until) over schedule_steps linear or cosine from
    start, the final one from until * schedule_steps steps on (Python floats, as the package)."""
    if freeze.get("sparsity_schedule") is None:
        return freeze["sparsity"]
    shape, start, until = freeze["sparsity_schedule"]
    end = until * freeze["schedule_steps"]
    if step >= end:
        return freeze["sparsity"]
    t = step / end
    if shape == "cosine":
        t = 0.5 * (1.0 - math.cos(math.pi * t))
    return start + (freeze["sparsity"] - start) * t


def regenerated(seed, key, row, generator_version, directory):
    """A parameter the ticket regenerates: a constant, or N(0, std**2) drawn like kaiming_normal
    weights on the stream "table" under its generator key (``row["key"]``, else its own name)."""
    shape, dtype = tuple(row["shape"]), row["dtype"]
    where = f"{os.path.join(directory, 'config.json')}: regenerated {key!r}"
    if dtype not in DTYPES:
        raise DecodeError(f"{where} has dtype {dtype!r}")
    if "value" in row:
        return round_to(np.full(shape, float(row["value"]), dtype=np.float64), dtype)
    if generator_version != 2:
        raise DecodeError(f"{where}: a table drawn by generator version {generator_version} is not decodable")
    h = hashes(seed, row.get("key", key), "table", math.prod(shape))
    return round_to(normal_fixed(h).astype(np.float64) * (float(row["std"]) * 2.0 ** -FRAC), dtype).reshape(shape)


def digest(pairs):
    """The package's tensor digest over (array, dtype) pairs: sha256 of "<dtype>[shape];" and the
    little-endian bytes of each, 128 bits (bfloat16 arrays, held as float32, hashed as bfloat16)."""
    h = hashlib.sha256()
    for value, dtype in pairs:
        h.update(f"{dtype}{list(value.shape)};".encode())
        if dtype == "bfloat16":
            raw = (np.ascontiguousarray(value, dtype=np.float32).view(np.uint32) >> np.uint32(16)).astype("<u2")
        else:
            raw = np.ascontiguousarray(value, dtype=np.dtype(dtype).newbyteorder("<"))
        h.update(raw.tobytes())
    return h.hexdigest()[:32]


def write_npz(arrays, path):
    """Atomically: a temporary file next to ``path``, renamed over it once complete."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".reference_decoder.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ticket", help="ticket directory (config.json, supermask.safetensors, ...)")
    parser.add_argument("--out", required=True, help="output .npz")
    args = parser.parse_args(argv)
    try:
        arrays = decode(args.ticket)
        write_npz(arrays, args.out)
    except DecodeError as err:
        print(f"reference_decoder: error: {err}", file=sys.stderr)
        return 2
    except (KeyError, TypeError, ValueError) as err:  # a config.json field missing or of the wrong type
        print(f"reference_decoder: error: {os.path.join(args.ticket, 'config.json')}: malformed "
              f"({type(err).__name__}: {err})", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"reference_decoder: error: {args.out}: cannot write ({err})", file=sys.stderr)
        return 2
    print(f"reference_decoder: {sum(k.endswith('.mask') for k in arrays)} masked tensors -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
